//! Shared by the integration tests: real hosts on 127.0.0.1:0, a small HTTP
//! client, and the components built from `functions/`.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use lichen::engine::EngineSettings;
use lichen::server::{ServeConfig, Server};

/// Every crate in functions/ (workspace members), by crate name. A test
/// checks this list against functions/Cargo.toml, and each entry is used by
/// a test, so a new fixture cannot go untested.
pub const FUNCTIONS: &[&str] = &[
    "hello",
    "echo",
    "square",
    "fib",
    "hash",
    "trap",
    "raw-wasi",
    "probe",
    "hello-p3",
    "hello-p3-raw",
    "echo-p3",
    "probe-p3",
    "trap-p3",
    "slow-p3",
    "cancel-p3",
    "counter",
    "notes",
    "kv-draft",
    "kv-draft-p3",
    "linreg",
    "config-rc1",
    "config-draft",
    "config-draft-2024",
    "motd",
    "redis",
    "consumer",
];

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("host/ has a parent")
        .to_path_buf()
}

/// Builds the guest components once per test process, unless the test
/// script already did (`LICHEN_FUNCTIONS_BUILT=1`).
fn ensure_built() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        if std::env::var_os("LICHEN_FUNCTIONS_BUILT").is_some() {
            return;
        }
        let status = Command::new(repo_root().join("functions/build.sh"))
            .status()
            .expect("running functions/build.sh");
        assert!(status.success(), "functions/build.sh failed");
    });
}

/// The built component of a crate in functions/.
pub fn component(name: &str) -> Vec<u8> {
    assert!(FUNCTIONS.contains(&name), "{name} is not in FUNCTIONS");
    ensure_built();
    let path = repo_root()
        .join("functions/target/wasm32-wasip2/release")
        .join(format!("{}.wasm", name.replace('-', "_")));
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; build the guests with functions/build.sh",
            path.display()
        )
    })
}

/// A component built by componentize-py from `functions/python/<name>/`.
pub fn python_component(name: &str) -> Vec<u8> {
    ensure_built();
    let path = repo_root()
        .join("functions/target/python")
        .join(format!("{name}_py.wasm"));
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; build the guests with functions/build.sh",
            path.display()
        )
    })
}

/// A host config for tests: port 0, a known admin token, and the policies
/// directory at `data_dir/policies`.
pub fn test_config(data_dir: &Path) -> ServeConfig {
    let mut config = ServeConfig::new("127.0.0.1:0".parse().unwrap(), data_dir);
    config.policies_dir = data_dir.join("policies");
    config.admin_token = Some("test-token".to_string());
    config.engine = EngineSettings::default();
    config.shutdown_grace = Duration::from_secs(5);
    // Stopping a test host should not wait for load balancers.
    config.drain = Duration::ZERO;
    config
}

/// Writes the policy file of `function` into the test config's policies
/// directory.
pub fn write_policy(data_dir: &Path, function: &str, toml: &str) {
    let dir = data_dir.join("policies");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("{function}.toml")), toml).unwrap();
}

/// A host running in this process.
pub struct TestHost {
    pub url: String,
    pub token: String,
    pub state: std::sync::Arc<lichen::api::AppState>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestHost {
    pub async fn start(config: ServeConfig) -> TestHost {
        let server = Server::bind(config).await.expect("host starts");
        let url = format!("http://{}", server.local_addr());
        let token = server.admin_token().to_string();
        let state = server.state();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(server.run(async {
            let _ = rx.await;
        }));
        TestHost {
            url,
            token,
            state,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// Stops the host and waits until it has let go of its data directory.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("host task").expect("host ran cleanly");
        }
    }

    pub async fn deploy(&self, name: &str, bytes: Vec<u8>) -> Reply {
        self.admin(Method::PUT, &format!("/v1/functions/{name}"), bytes)
            .await
    }

    /// [`TestHost::deploy`] of a component with a language runtime in it
    /// (tens of MB), whose compilation in the test build may take longer
    /// than [`PATIENCE`] on a loaded machine.
    pub async fn deploy_large(&self, name: &str, bytes: Vec<u8>) -> Reply {
        let path = format!("/v1/functions/{name}");
        self.admin_within(COMPILE_PATIENCE, Method::PUT, &path, bytes)
            .await
    }

    pub async fn admin(&self, method: Method, path: &str, body: Vec<u8>) -> Reply {
        self.admin_within(PATIENCE, method, path, body).await
    }

    /// [`TestHost::admin`], answered within `limit`.
    async fn admin_within(
        &self,
        limit: Duration,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Reply {
        send_within(
            limit,
            method,
            &format!("{}{path}", self.url),
            &[("authorization", &format!("Bearer {}", self.token))],
            body,
        )
        .await
    }

    pub async fn get(&self, path: &str) -> Reply {
        send(Method::GET, &format!("{}{path}", self.url), &[], Vec::new()).await
    }

    pub async fn metric(&self, name: &str) -> f64 {
        let reply = self.get("/metrics").await;
        metric_value(&reply.text(), name)
    }
}

/// Starts a host with the policies already in `dir` and deploys each
/// `(name, fixture)`.
pub async fn host_with(dir: &Path, functions: &[(&str, &str)]) -> TestHost {
    let host = TestHost::start(test_config(dir)).await;
    for (name, fixture) in functions {
        let reply = host.deploy(name, component(fixture)).await;
        assert_eq!(
            reply.status,
            StatusCode::CREATED,
            "{name}: {}",
            reply.text()
        );
    }
    host
}

impl Drop for TestHost {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// A response, read in full.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// The `code` of a JSON error body.
    pub fn code(&self) -> String {
        self.json()["code"].as_str().unwrap_or_default().to_string()
    }

    /// Asserts a JSON error answer with this status and code.
    pub fn assert_error(&self, status: StatusCode, code: &str) {
        assert_eq!(self.status, status, "{}", self.text());
        assert_eq!(self.code(), code, "{}", self.text());
    }

    /// Asserts an answer with this status whose JSON `error` message says
    /// `part` (errors from the SDK carry a message but no code).
    pub fn assert_error_says(&self, status: StatusCode, part: &str) {
        assert_eq!(self.status, status, "{}", self.text());
        let says = self.json()["error"]
            .as_str()
            .is_some_and(|message| message.contains(part));
        assert!(says, "{}", self.text());
    }
}

fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A request to `url` + `path` with `token` as its bearer.
pub async fn with_token(
    url: &str,
    token: &str,
    method: Method,
    path: &str,
    body: Vec<u8>,
) -> Reply {
    let bearer = format!("Bearer {token}");
    send(
        method,
        &format!("{url}{path}"),
        &[("authorization", &bearer)],
        body,
    )
    .await
}

/// Makes a scoped API token on the host at `url` with `admin` (the admin
/// token); answers the token.
pub async fn make_token(url: &str, admin: &str, request: serde_json::Value) -> String {
    let body = serde_json::to_vec(&request).unwrap();
    let made = with_token(url, admin, Method::POST, "/v1/tokens", body).await;
    assert_eq!(made.status, StatusCode::CREATED, "{}", made.text());
    made.json()["token"].as_str().unwrap().to_string()
}

pub async fn send(method: Method, url: &str, headers: &[(&str, &str)], body: Vec<u8>) -> Reply {
    send_within(PATIENCE, method, url, headers, body).await
}

/// [`send`], answered within `limit`.
pub async fn send_within(
    limit: Duration,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Reply {
    let mut request = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Full::new(Bytes::from(body))).expect("request");
    send_request_within(limit, request).await
}

pub async fn send_request(request: Request<Full<Bytes>>) -> Reply {
    send_request_within(PATIENCE, request).await
}

/// [`send_request`] for a request that may take longer than [`PATIENCE`]
/// on a loaded machine (a guest told to do a lot of work).
pub async fn send_request_within(limit: Duration, request: Request<Full<Bytes>>) -> Reply {
    tokio::time::timeout(limit, try_send_request(request))
        .await
        .unwrap_or_else(|_| panic!("the host answers within {limit:?}"))
        .expect("the host answers")
}

/// Like [`send`], for a host that may be gone: `None` if the connection or
/// the body failed.
pub async fn try_send(method: Method, url: &str, body: Vec<u8>) -> Option<Reply> {
    let request = Request::builder()
        .method(method)
        .uri(url)
        .body(Full::new(Bytes::from(body)))
        .expect("request");
    try_send_request(request).await.ok()
}

/// How a request without an answer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoAnswer {
    /// No connection: the request never reached the host.
    Refused,
    /// Sent, then no answer (a timeout, a connection cut): it may have
    /// taken effect or not.
    Unknown,
}

/// One request to a host that may be down, partitioned or paused: the
/// answer, or how it ended without one within `limit`.
pub async fn call(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
    limit: Duration,
) -> Result<Reply, NoAnswer> {
    let mut request = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Full::new(Bytes::from(body))).expect("request");
    match tokio::time::timeout(limit, try_send_request(request)).await {
        Err(_) => Err(NoAnswer::Unknown),
        Ok(Ok(reply)) => Ok(reply),
        Ok(Err(error)) => {
            let refused = error
                .downcast_ref::<hyper_util::client::legacy::Error>()
                .is_some_and(|e| e.is_connect());
            Err(if refused {
                NoAnswer::Refused
            } else {
                NoAnswer::Unknown
            })
        }
    }
}

async fn try_send_request(request: Request<Full<Bytes>>) -> anyhow::Result<Reply> {
    let response = client().request(request).await?;
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await?.to_bytes();
    Ok(Reply {
        status,
        headers,
        body,
    })
}

/// The value of an unlabelled sample (or the sum over all label sets) in
/// Prometheus text.
pub fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let series_name = series.split('{').next()?;
            (series_name == name).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// How long a test waits for something that must happen, however slow or
/// loaded the machine: a bound only a broken host reaches, never one that a
/// test's result depends on.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// How long compiling a large component may take in the test build on a
/// loaded machine: a bound only a broken host reaches.
pub const COMPILE_PATIENCE: Duration = Duration::from_secs(600);

/// Polls `check` until it holds, failing after [`PATIENCE`].
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = std::time::Instant::now();
    while !check().await {
        assert!(
            started.elapsed() < PATIENCE,
            "not within {PATIENCE:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The sum of the series whose text starts with `prefix` (a family name, or
/// a name and the start of its labels) in Prometheus text.
pub fn series_sum(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits until the host at `url` counts `function`'s invocations running
/// now (`lichen_inflight`) at `at_least`: the event a test waits for
/// before it acts on requests in flight, instead of a guessed sleep.
pub async fn until_in_flight(url: &str, function: &str, at_least: f64) {
    let series = format!("lichen_inflight{{function=\"{function}\"}}");
    eventually(
        &format!("{at_least} of {function} in flight at {url}"),
        || async {
            let metrics = send(Method::GET, &format!("{url}/metrics"), &[], Vec::new()).await;
            series_sum(&metrics.text(), &series) >= at_least
        },
    )
    .await;
}

/// What arrives on `rx`, as a stream that ends when every sender is gone:
/// a request body a test sends piece by piece, when it chooses.
pub fn stream_of<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// `component` with a custom section appended: other bytes and hash, same
/// behaviour.
pub fn distinct(component: &[u8], tag: &str) -> Vec<u8> {
    let name = b"lichen-test";
    let mut contents = vec![name.len() as u8];
    contents.extend_from_slice(name);
    contents.extend_from_slice(tag.as_bytes());
    assert!(contents.len() < 128, "one LEB128 byte for the size");
    let mut out = component.to_vec();
    out.push(0);
    out.push(contents.len() as u8);
    out.extend_from_slice(&contents);
    out
}

/// The official `wasmtime serve` with a component, on a free loopback port;
/// killed when dropped. Installs wasmtime (scripts/install-wasmtime.sh)
/// when it is missing.
pub struct WasmtimeServe {
    _child: Spawned,
    pub url: String,
}

impl WasmtimeServe {
    /// `extra`: more `serve` options, such as `-S keyvalue`.
    pub fn start(component: &std::path::Path, extra: &[&str]) -> WasmtimeServe {
        use std::io::{BufRead, BufReader};
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let bin = root.join("target/tools/wasmtime/lib/wasmtime");
        if !bin.exists() {
            let status = std::process::Command::new(root.join("scripts/install-wasmtime.sh"))
                .status()
                .expect("running scripts/install-wasmtime.sh");
            assert!(status.success(), "installing wasmtime failed");
        }
        let mut child = std::process::Command::new(&bin)
            .args(["serve", "-S", "cli", "--addr", "127.0.0.1:0"])
            .args(extra)
            .arg(component)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map(Spawned::new)
            .expect("starting wasmtime serve");
        let stderr = child.stderr.take().unwrap();
        let mut lines = BufReader::new(stderr).lines();
        let url = loop {
            let line = lines
                .next()
                .expect("wasmtime serve printed its address")
                .unwrap();
            if let Some(at) = line.find("http://") {
                break line[at..].trim_end_matches('/').to_string();
            }
        };
        std::thread::spawn(move || lines.for_each(drop));
        WasmtimeServe { _child: child, url }
    }
}

/// A process a test started: stopped and reaped when dropped, so a test that
/// fails half-way leaves nothing running. It derefs to the
/// [`std::process::Child`] for `id`, `kill`, `wait` and `try_wait`.
pub struct Spawned {
    child: std::process::Child,
    /// How long a SIGTERM may take before SIGKILL; `None`: SIGKILL at once.
    grace: Option<Duration>,
}

impl Spawned {
    /// Killed with SIGKILL when dropped.
    pub fn new(child: std::process::Child) -> Spawned {
        Spawned { child, grace: None }
    }

    /// Asked to stop with SIGTERM when dropped, killed if still running
    /// after `grace`: for a process that has children of its own to stop
    /// (node stops the Chromium that Playwright started).
    pub fn terminated_within(child: std::process::Child, grace: Duration) -> Spawned {
        Spawned {
            child,
            grace: Some(grace),
        }
    }
}

impl std::ops::Deref for Spawned {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.child
    }
}

impl std::ops::DerefMut for Spawned {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.child
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let (Some(grace), Ok(None)) = (self.grace, self.child.try_wait()) {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
            let deadline = std::time::Instant::now() + grace;
            while std::time::Instant::now() < deadline {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the real `lichen serve` binary on port 0 with the policies at
/// `data_dir/policies`; returns it with the URL from its log line and the
/// thread that keeps reading (and returns) its log.
pub fn spawn_lichen(
    data_dir: &std::path::Path,
    extra: &[&str],
) -> (Spawned, String, std::thread::JoinHandle<Vec<String>>) {
    spawn_lichen_with_env(data_dir, extra, &[])
}

/// [`spawn_lichen`] with these environment variables.
pub fn spawn_lichen_with_env(
    data_dir: &std::path::Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (Spawned, String, std::thread::JoinHandle<Vec<String>>) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_lichen"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .arg("--policies")
        .arg(data_dir.join("policies"))
        .args(extra)
        .env_remove("LICHEN_ADMIN_TOKEN")
        .envs(env.iter().copied())
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .map(Spawned::new)
        .expect("starting lichen serve");
    let stderr = child.stderr.take().expect("stderr is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    // Keep reading the log so the host never blocks on a full pipe.
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok) {
            if let Some(url) = lichen::server::listening_url(&line) {
                let _ = tx.send(url);
            }
            lines.push(line);
        }
        lines
    });
    let url = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the host logs the address it listens on");
    (child, url, reader)
}

/// A real `nats-server` with JetStream on free loopback ports, its data in
/// `dir`; killed when dropped. Installs nats-server
/// (scripts/install-nats-server.sh) when it is missing.
pub struct NatsServer {
    child: Option<Spawned>,
    pub url: String,
    args: Vec<String>,
    monitor: u16,
}

pub fn nats_server_bin() -> PathBuf {
    let root = repo_root();
    let bin = root.join("target/tools/nats-server/bin/nats-server");
    if !bin.exists() {
        let status = Command::new(root.join("scripts/install-nats-server.sh"))
            .status()
            .expect("running scripts/install-nats-server.sh");
        assert!(status.success(), "installing nats-server failed");
    }
    bin
}

/// A nats-server configuration file enabling JetStream in `store`, with
/// `sync_interval: always`.
fn jetstream_config(dir: &Path, name: &str, store: &Path) -> PathBuf {
    let path = dir.join(format!("{name}.conf"));
    let config = format!(
        "jetstream {{\n  store_dir: {:?}\n  sync_interval: always\n}}\n",
        store.display().to_string()
    );
    std::fs::write(&path, config).unwrap();
    path
}

/// How many times a server that exited at start (a port taken from under
/// it) is started again on other ports.
const PORT_ATTEMPTS: usize = 3;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl NatsServer {
    /// One server, alone.
    pub fn start(dir: &Path) -> NatsServer {
        for attempt in 0..PORT_ATTEMPTS {
            let port = free_port();
            let dir = dir.join(format!("attempt-{attempt}"));
            let mut server = NatsServer::configured(&dir, "n1", port, Vec::new());
            server.spawn();
            if server.wait_ready() {
                return server;
            }
        }
        panic!("nats-server exited {PORT_ATTEMPTS} times before it was ready");
    }

    /// Three servers in one cluster (`lichen-test`), each with JetStream.
    pub fn cluster(dir: &Path) -> Vec<NatsServer> {
        for attempt in 0..PORT_ATTEMPTS {
            // A fresh directory each time: nothing of a failed start's state.
            let mut servers =
                NatsServer::cluster_on_free_ports(&dir.join(format!("attempt-{attempt}")));
            if servers.iter_mut().all(NatsServer::wait_ready) {
                return servers;
            }
        }
        panic!("a nats-server exited {PORT_ATTEMPTS} times before its cluster was ready");
    }

    fn cluster_on_free_ports(dir: &Path) -> Vec<NatsServer> {
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, cluster)| format!("nats://127.0.0.1:{cluster}"))
            .collect();
        let mut servers: Vec<NatsServer> = ports
            .iter()
            .enumerate()
            .map(|(i, (port, cluster))| {
                let cluster_args = vec![
                    "--cluster_name".to_string(),
                    "lichen-test".to_string(),
                    "--cluster".to_string(),
                    format!("nats://127.0.0.1:{cluster}"),
                    "--routes".to_string(),
                    routes.join(","),
                ];
                NatsServer::configured(dir, &format!("n{}", i + 1), *port, cluster_args)
            })
            .collect();
        for server in &mut servers {
            server.spawn();
        }
        servers
    }

    /// Waits until a cluster of `servers` can place a stream with a
    /// replica on each: `/healthz` answers before every server has heard
    /// of the others' JetStream, and a bucket made then fails with "no
    /// suitable peers for placement".
    pub async fn until_replicated(servers: &[NatsServer]) {
        let addrs: Vec<async_nats::ServerAddr> =
            servers.iter().map(|s| s.url.parse().unwrap()).collect();
        let client = async_nats::connect(addrs)
            .await
            .expect("connecting to the test NATS cluster");
        let jetstream = async_nats::jetstream::new(client);
        let config = async_nats::jetstream::stream::Config {
            name: "lichen-test-placement".to_string(),
            subjects: vec!["lichen-test-placement".to_string()],
            num_replicas: servers.len(),
            ..Default::default()
        };
        let started = std::time::Instant::now();
        loop {
            match jetstream.create_stream(config.clone()).await {
                Ok(_) => break,
                Err(error) => assert!(
                    started.elapsed() < PATIENCE,
                    "the NATS cluster cannot place a stream on {} servers: {error}",
                    servers.len()
                ),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        jetstream
            .delete_stream(&config.name)
            .await
            .expect("deleting the placement probe");
    }

    fn configured(dir: &Path, name: &str, port: u16, extra: Vec<String>) -> NatsServer {
        std::fs::create_dir_all(dir).unwrap();
        let monitor = free_port();
        let store = dir.join(name);
        let mut args = vec![
            "--addr".to_string(),
            "127.0.0.1".to_string(),
            "--port".to_string(),
            port.to_string(),
            "--http_port".to_string(),
            monitor.to_string(),
            "--server_name".to_string(),
            name.to_string(),
            // JetStream as production runs it (the README): every write
            // fsynced before it is acknowledged.
            "--config".to_string(),
            jetstream_config(dir, name, &store).display().to_string(),
        ];
        args.extend(extra);
        NatsServer {
            child: None,
            url: format!("nats://127.0.0.1:{port}"),
            args,
            monitor,
        }
    }

    fn spawn(&mut self) {
        let child = Command::new(nats_server_bin())
            .args(&self.args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map(Spawned::new)
            .expect("starting nats-server");
        self.child = Some(child);
    }

    /// Waits until the server says JetStream is ready (its `/healthz`);
    /// `false` if it exited first, as it does when one of its ports was
    /// taken between choosing it and binding it (the caller tries others).
    fn wait_ready(&mut self) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if self.healthy() {
                return true;
            }
            let exited = self
                .child
                .as_mut()
                .is_none_or(|child| !matches!(child.try_wait(), Ok(None)));
            if exited {
                return false;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "nats-server at {} not ready within 60 s",
                self.url
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn healthy(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", self.monitor)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        if stream
            .write_all(b"GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).is_ok() && head.ends_with(b" 200")
    }

    /// Kills the server (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        drop(self.child.take());
    }

    /// Starts a killed server again, on its port and data.
    pub fn restart(&mut self) {
        self.spawn();
        assert!(
            self.wait_ready(),
            "nats-server {} exited on restart",
            self.url
        );
    }
}

/// A test CA.
pub struct Ca {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl Ca {
    pub fn new() -> Ca {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Lichen test CA");
        let issuer =
            rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
                .unwrap();
        Ca { issuer }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    pub fn der(&self) -> rustls::pki_types::CertificateDer<'static> {
        self.issuer.der().clone()
    }

    /// A certificate for `names`, valid now unless `expired`; PEM of the
    /// certificate and of its key.
    pub fn leaf(&self, names: &[&str], common_name: &str, expired: bool) -> (String, String) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        if expired {
            params.not_before = rcgen::date_time_ymd(2000, 1, 1);
            params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        }
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// Client settings trusting `ca` alone, offering `alpn`.
pub fn tls_client_config(ca: &Ca, alpn: &[&[u8]]) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der()).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config
}

/// A TLS connection to `addr` as `name`, trusting `ca`, offering `alpn`.
pub async fn tls_connect(
    ca: &Ca,
    addr: &str,
    name: &str,
    alpn: &[&[u8]],
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let connector =
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls_client_config(ca, alpn)));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    connector
        .connect(
            rustls::pki_types::ServerName::try_from(name.to_string()).unwrap(),
            tcp,
        )
        .await
}

/// `GET path` over an HTTP/1.1 or HTTP/2 connection on `tls`.
pub async fn tls_get(
    tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    path: &str,
) -> (StatusCode, Bytes) {
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let request = Request::get(format!("https://localhost{path}"))
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = if h2 {
        let (mut sender, connection) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tls),
        )
        .await
        .unwrap();
        tokio::spawn(connection);
        sender.send_request(request).await.unwrap()
    } else {
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(connection);
        sender.send_request(request).await.unwrap()
    };
    let status = response.status();
    (
        status,
        response.into_body().collect().await.unwrap().to_bytes(),
    )
}

/// A real OCI registry (Debian's `docker-registry`, the CNCF distribution
/// registry) on a free loopback port, plain HTTP, with basic auth when
/// `user` is given; killed when dropped. Installs the package when it is
/// missing.
pub struct OciRegistry {
    _child: Spawned,
    /// `127.0.0.1:PORT`: the registry part of references.
    pub address: String,
    auth: oci_client::secrets::RegistryAuth,
}

impl OciRegistry {
    pub fn start(dir: &Path, user: Option<(&str, &str)>) -> OciRegistry {
        let bin = Path::new("/usr/bin/docker-registry");
        if !bin.exists() {
            let status = Command::new(repo_root().join("scripts/apt-install.sh"))
                .arg("docker-registry")
                .status()
                .expect("running scripts/apt-install.sh");
            assert!(status.success(), "installing docker-registry failed");
        }
        std::fs::create_dir_all(dir).unwrap();
        let port = free_port();
        let address = format!("127.0.0.1:{port}");
        let mut config = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {address}\n  secret: lichen-test-registry\n",
            dir.join("data").display()
        );
        let auth = match user {
            Some((name, password)) => {
                let hash = bcrypt::hash_with_result(password, 4)
                    .unwrap()
                    .format_for_version(bcrypt::Version::TwoY);
                let htpasswd = dir.join("htpasswd");
                std::fs::write(&htpasswd, format!("{name}:{hash}\n")).unwrap();
                config.push_str(&format!(
                    "auth:\n  htpasswd:\n    realm: lichen-test\n    path: {}\n",
                    htpasswd.display()
                ));
                oci_client::secrets::RegistryAuth::Basic(name.to_string(), password.to_string())
            }
            None => oci_client::secrets::RegistryAuth::Anonymous,
        };
        let config_path = dir.join("config.yml");
        std::fs::write(&config_path, config).unwrap();
        let child = Command::new(bin)
            .arg("serve")
            .arg(&config_path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map(Spawned::new)
            .expect("starting docker-registry");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&address).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "docker-registry did not listen"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        OciRegistry {
            _child: child,
            address,
            auth,
        }
    }

    /// Pushes an artifact of these layers and config as `repository:tag`;
    /// returns the reference with the manifest's digest.
    pub async fn push(
        &self,
        repository: &str,
        tag: &str,
        config: (&str, &[u8]),
        layers: &[(&str, &[u8])],
    ) -> String {
        lichen::tls::install_crypto_provider();
        let client = oci_client::Client::try_from(oci_client::client::ClientConfig {
            protocol: oci_client::client::ClientProtocol::Http,
            ..Default::default()
        })
        .unwrap();
        let reference: oci_client::Reference = format!("{}/{repository}:{tag}", self.address)
            .parse()
            .unwrap();
        let layers: Vec<oci_client::client::ImageLayer> = layers
            .iter()
            .map(|(media_type, data)| {
                oci_client::client::ImageLayer::new(data.to_vec(), media_type.to_string(), None)
            })
            .collect();
        let config = oci_client::client::Config::new(config.1.to_vec(), config.0.to_string(), None);
        client
            .push(&reference, &layers, config, &self.auth, None)
            .await
            .expect("pushing to the test registry");
        let (_, digest) = client
            .pull_manifest(&reference, &self.auth)
            .await
            .expect("reading back the pushed manifest");
        format!("{}/{repository}:{tag}@{digest}", self.address)
    }

    /// Pushes `component` in the CNCF wasm artifact layout.
    pub async fn push_component(&self, repository: &str, tag: &str, component: &[u8]) -> String {
        self.push(
            repository,
            tag,
            (
                lichen::oci::WASM_CONFIG,
                b"{\"architecture\":\"wasm\",\"os\":\"wasip2\"}",
            ),
            &[(lichen::oci::WASM_LAYER, component)],
        )
        .await
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The signature header of an internal request to `url`, as a peer holding
/// `secret` makes it for the host `receiver` (`lichen_core::seal`), timed
/// now, over the `headers` the request will carry (and the `Host` of
/// `url`); over `body` if given.
pub fn peer_signature(
    secret: &str,
    method: &str,
    url: &str,
    receiver: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> String {
    let secret = lichen_core::seal::Secret::new(secret).unwrap();
    let digest = body.map(lichen_core::seal::body_digest);
    let uri: http::Uri = url.parse().unwrap();
    let mut map = http::HeaderMap::new();
    map.insert("host", uri.authority().unwrap().as_str().parse().unwrap());
    for (name, value) in headers {
        map.append(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    let target = uri.path_and_query().map_or("/", |p| p.as_str());
    lichen_core::seal::sign_request(
        &secret,
        method,
        target,
        receiver,
        &lichen_core::seal::canonical_headers(&map),
        digest.as_ref(),
        unix_ms(),
    )
    .unwrap()
}

/// Stops a host the way an operator does (SIGTERM) and waits for it to
/// exit, at most [`PATIENCE`]; returns how it exited.
pub fn stop_gracefully(child: &mut std::process::Child) -> std::process::ExitStatus {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the host did not stop within {PATIENCE:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every file under `dir`, recursively.
pub fn files_under(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// Runs `command` with `input` on its standard input; what it printed and
/// how it ended.
pub fn run_with_input(command: &mut std::process::Command, input: &[u8]) -> std::process::Output {
    use std::io::Write;
    let mut child = command
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

/// Debian's libfaketime (package `faketime`).
pub fn libfaketime() -> PathBuf {
    let lib = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|arch| arch.path().join("faketime/libfaketime.so.1"))
        .find(|path| path.exists());
    lib.expect("libfaketime (Debian's faketime package; scripts/test.sh installs it)")
}
