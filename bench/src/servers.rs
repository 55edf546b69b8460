//! The servers under test, each a child process: Lichen (`lichen serve`),
//! the official `wasmtime serve`, and a minimal native hyper server. Every
//! server is started and stopped the same way, unpinned, on the same cores
//! as the load tool.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Admin token of the Lichen hosts the benchmark starts.
pub const TOKEN: &str = "bench-token";

pub struct Server {
    pub url: String,
    child: Child,
}

impl Server {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory of the server process, in bytes.
    pub fn rss_bytes(&self) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .context("no VmRSS")?
            .parse()?;
        Ok(kib * 1024)
    }

    pub fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a `nats-server` with JetStream on a free loopback port, its data
/// in `dir`; returns once it accepts connections.
pub fn nats(bin: &Path, dir: &Path) -> Result<Server> {
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    std::fs::create_dir_all(dir)?;
    let child = Command::new(bin)
        .args([
            "--addr",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--jetstream",
        ])
        .arg("--store_dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("nats-server did not accept connections within 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(Server {
        url: format!("nats://127.0.0.1:{port}"),
        child,
    })
}

/// Starts `lichen serve` on a free port with `data_dir` and `policies`;
/// returns once it logs its address.
pub fn lichen(bin: &Path, data_dir: &Path, policies: &Path) -> Result<Server> {
    lichen_with(bin, data_dir, policies, &[])
}

/// The flags of a host whose key-value backend is the NATS at `url` (one
/// replica).
pub fn on_nats(url: &str) -> Vec<String> {
    [
        "--kv-backend",
        "nats",
        "--kv-nats-url",
        url,
        "--kv-nats-replicas",
        "1",
    ]
    .map(String::from)
    .to_vec()
}

/// [`lichen`] with more `serve` arguments (cluster flags).
pub fn lichen_with(
    bin: &Path,
    data_dir: &Path,
    policies: &Path,
    extra: &[String],
) -> Result<Server> {
    let mut child = Command::new(bin)
        .args(["serve", "--listen", "127.0.0.1:0", "--admin-token", TOKEN])
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--policies")
        .arg(policies)
        .args(extra)
        .env("RUST_LOG", "warn,lichen::server=info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let url = read_listening_line(&mut child)?;
    Ok(Server { url, child })
}

/// Waits for the "listening on http://..." line, then keeps draining the
/// log in the background so the server never blocks on a full pipe.
fn read_listening_line(child: &mut Child) -> Result<String> {
    let stderr = child.stderr.take().context("stderr not piped")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(url) = lichen::server::listening_url(&line) {
                let _ = tx.send(url);
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(120))
        .context("the server did not log its address within 120 s")
}

/// Starts the official `wasmtime serve` with `component` on a free port.
pub fn wasmtime(bin: &Path, component: &Path) -> Result<Server> {
    wasmtime_with(bin, component, &[])
}

/// `wasmtime serve` with extra flags (instance reuse settings).
pub fn wasmtime_with(bin: &Path, component: &Path, flags: &[&str]) -> Result<Server> {
    let port = free_port()?;
    let addr = format!("127.0.0.1:{port}");
    let child = Command::new(bin)
        .args(["serve", "-S", "cli", "--addr", &addr])
        .args(flags)
        .arg(component)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    wait_for_port(&addr)?;
    Ok(Server {
        url: format!("http://{addr}"),
        child,
    })
}

/// Starts this binary's minimal native hyper server.
pub fn native(self_exe: &Path) -> Result<Server> {
    let mut child = Command::new(self_exe)
        .args(["native-hello", "127.0.0.1:0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let url = read_listening_line(&mut child)?;
    Ok(Server { url, child })
}

fn free_port() -> Result<u16> {
    // Racy in principle (the port is released before the server binds it);
    // on a machine running only this benchmark it is good enough.
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_for_port(addr: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("nothing listening on {addr} after 60 s")
}

/// A minimal native hyper "hello" server: the ceiling for any host.
pub async fn run_native_hello(addr: &str) -> Result<()> {
    use http_body_util::Full;
    use hyper::server::conn::http1;
    use hyper_util::rt::TokioIo;

    let listener = tokio::net::TcpListener::bind(addr).await?;
    eprintln!(
        "{}{}",
        lichen::server::LISTENING_PREFIX,
        listener.local_addr()?
    );
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(|_req| async {
                Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                    bytes::Bytes::from_static(b"Hello from Lichen!\n"),
                )))
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// PUTs a component to a Lichen host.
pub fn deploy(url: &str, name: &str, bytes: &[u8]) -> Result<()> {
    let status = crate::load::blocking_request(
        "PUT",
        &format!("{url}/v1/functions/{name}"),
        Some(TOKEN),
        bytes,
    )?;
    if !(200..300).contains(&status) {
        bail!("deploying {name}: HTTP {status}");
    }
    Ok(())
}

/// A copy of `component` with a custom section appended, so it has another
/// hash (and gets compiled and stored on its own) but behaves the same.
pub fn distinct_component(component: &[u8], tag: &str) -> Vec<u8> {
    fn leb(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    let name = b"lichen-bench";
    let mut contents = Vec::new();
    leb(name.len(), &mut contents);
    contents.extend_from_slice(name);
    contents.extend_from_slice(tag.as_bytes());
    let mut out = component.to_vec();
    out.push(0); // custom section
    leb(contents.len(), &mut out);
    out.extend_from_slice(&contents);
    out
}

/// A scratch directory under the system temp dir, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(label: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("lichen-bench-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("policies"))?;
        Ok(Scratch(dir))
    }

    pub fn data(&self) -> PathBuf {
        self.0.join("data")
    }

    pub fn policies(&self) -> PathBuf {
        self.0.join("policies")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
