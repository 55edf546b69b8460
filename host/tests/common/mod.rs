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
    "echo-p3",
    "probe-p3",
    "trap-p3",
    "slow-p3",
    "cancel-p3",
];

fn repo_root() -> PathBuf {
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

    pub async fn admin(&self, method: Method, path: &str, body: Vec<u8>) -> Reply {
        send(
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

pub async fn send(method: Method, url: &str, headers: &[(&str, &str)], body: Vec<u8>) -> Reply {
    let mut request = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Full::new(Bytes::from(body))).expect("request");
    send_request(request).await
}

pub async fn send_request(request: Request<Full<Bytes>>) -> Reply {
    let response = tokio::time::timeout(Duration::from_secs(60), client().request(request))
        .await
        .expect("the host answers within 60 s")
        .expect("the host answers");
    let status = response.status();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("reading the body")
        .to_bytes();
    Reply {
        status,
        headers,
        body,
    }
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
