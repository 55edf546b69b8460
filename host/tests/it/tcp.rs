//! Outbound TCP through `wasi:sockets`, against a real `redis-server`
//! (Debian's) the test starts on a free loopback port: the `redis` example
//! stores and reads values when its policy grants the server, and is
//! refused (the guest's own `access-denied`, counted) for an address, a
//! name or a port the policy does not grant, and past
//! `max_tcp_connections`; a refused connect never reaches the server, and
//! past `max_tcp_bytes` a write fails before any of it is sent.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use http::{Method, StatusCode};

use crate::common::{self, Reply, TestHost, host_with, repo_root, send, series_sum, write_policy};

/// A `redis-server` on a free loopback port, without persistence; killed
/// when dropped.
struct Redis {
    _child: common::Spawned,
    port: u16,
}

impl Redis {
    fn start(dir: &Path) -> Redis {
        if which("redis-server").is_none() {
            // Installed like every other Debian package the tests use.
            let status = Command::new(repo_root().join("scripts/apt-install.sh"))
                .arg("redis-server")
                .status()
                .expect("running scripts/apt-install.sh");
            assert!(status.success(), "installing redis-server failed");
        }
        for attempt in 0..3 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .unwrap()
                .port();
            let dir = dir.join(format!("redis-{attempt}"));
            std::fs::create_dir_all(&dir).unwrap();
            let child = Command::new("redis-server")
                .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
                .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
                .arg("--dir")
                .arg(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("starting redis-server");
            let mut child = common::Spawned::new(child);
            let deadline = Instant::now() + common::PATIENCE;
            while Instant::now() < deadline {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    break; // the port was taken meanwhile: another one
                }
                let redis = Redis {
                    _child: child,
                    port,
                };
                if redis
                    .command("PING")
                    .is_some_and(|r| r.starts_with("+PONG"))
                {
                    return redis;
                }
                child = redis._child;
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("redis-server did not start");
    }

    /// Sends an inline command and reads the first reply (a bulk reply's
    /// payload included).
    fn command(&self, command: &str) -> Option<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        stream.set_read_timeout(Some(common::PATIENCE)).ok()?;
        stream.write_all(format!("{command}\r\n").as_bytes()).ok()?;
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line).ok()?;
        if let Some(len) = line
            .strip_prefix('$')
            .and_then(|l| l.trim().parse::<usize>().ok())
        {
            let mut body = vec![0; len + 2];
            reader.read_exact(&mut body).ok()?;
            line.push_str(&String::from_utf8_lossy(&body));
        }
        Some(line)
    }

    /// Connections the server has taken since it started.
    fn connections(&self) -> u64 {
        let info = self.command("INFO stats").unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("total_connections_received:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }
}

fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(program))
            .find(|candidate| candidate.is_file())
    })
}

async fn call(host: &TestHost, function: &str, method: Method, key: &str, body: &str) -> Reply {
    send(
        method,
        &format!("{}/fn/{function}/?key={key}", host.url),
        &[],
        body.as_bytes().to_vec(),
    )
    .await
}

fn policy(target: &str, grants: &[&str], extra: &str) -> String {
    let grants: Vec<String> = grants.iter().map(|g| format!("{g:?}")).collect();
    format!(
        "[config]\nredis = {target:?}\n\n[outbound]\ntcp = [{}]\n{extra}",
        grants.join(", ")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_example_reaches_only_what_its_policy_grants() {
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start(dir.path());
    let port = redis.port;
    let at = format!("127.0.0.1:{port}");
    let functions = [
        ("granted", policy(&at, &[&at], "")),
        // The server's address, not granted: another loopback address is.
        (
            "ungranted",
            policy(&at, &[&format!("127.0.0.2:{port}")], ""),
        ),
        // A port the grant does not name.
        (
            "other-port",
            policy(&format!("127.0.0.1:{}", port + 1), &[&at], ""),
        ),
        // A granted name that resolves to loopback, whose address no grant
        // names: internal addresses are reached only when named.
        (
            "by-name",
            policy(
                &format!("localhost:{port}"),
                &[&format!("localhost:{port}")],
                "",
            ),
        ),
        // A name no grant names: not even looked up.
        (
            "unnamed",
            policy(&format!("redis.example:{port}"), &[&at], ""),
        ),
        // 64 bytes of TCP, sent and received.
        ("metered", policy(&at, &[&at], "max_tcp_bytes = 64\n")),
        // One connection per instance, and the instance kept between calls.
        (
            "limited",
            policy(
                &at,
                &[&at],
                "max_tcp_connections = 1\n\n[instances]\nreuse = 100\n",
            ),
        ),
    ];
    for (name, text) in &functions {
        write_policy(dir.path(), name, text);
    }
    let deploy: Vec<(&str, &str)> = functions.iter().map(|(name, _)| (*name, "redis")).collect();
    let host = host_with(dir.path(), &deploy).await;

    let stored = call(&host, "granted", Method::PUT, "greeting", "hello over tcp").await;
    assert_eq!(stored.status, StatusCode::OK, "{}", stored.text());
    assert_eq!(stored.json()["stored"], true);
    let read = call(&host, "granted", Method::GET, "greeting", "").await;
    assert_eq!(read.status, StatusCode::OK, "{}", read.text());
    assert_eq!(read.json()["value"], "hello over tcp");
    assert!(
        redis
            .command("GET greeting")
            .unwrap()
            .contains("hello over tcp")
    );
    let missing = call(&host, "granted", Method::GET, "none", "").await;
    assert_eq!(missing.json()["value"], serde_json::Value::Null);

    let before = redis.connections();
    for function in ["ungranted", "other-port", "by-name", "unnamed"] {
        let refused = call(&host, function, Method::GET, "greeting", "").await;
        assert_eq!(
            refused.status,
            StatusCode::BAD_GATEWAY,
            "{function}: {}",
            refused.text()
        );
        assert!(
            refused.text().contains("access-denied"),
            "{function}: {}",
            refused.text()
        );
    }
    // Only this test's own INFO connection since.
    assert_eq!(redis.connections(), before + 1);

    // A GET and its answer fit in 64 bytes; a SET of 100 bytes does not,
    // and none of it leaves.
    let small = call(&host, "metered", Method::GET, "greeting", "").await;
    assert_eq!(small.status, StatusCode::OK, "{}", small.text());
    assert_eq!(small.json()["value"], "hello over tcp");
    let big = call(&host, "metered", Method::PUT, "big", &"x".repeat(100)).await;
    assert_eq!(big.status, StatusCode::BAD_GATEWAY, "{}", big.text());
    assert!(big.text().contains("max_tcp_bytes"), "{}", big.text());
    assert!(redis.command("EXISTS big").unwrap().starts_with(":0"));

    let first = call(&host, "limited", Method::GET, "greeting", "").await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text());
    let second = call(&host, "limited", Method::GET, "greeting", "").await;
    assert_eq!(second.status, StatusCode::BAD_GATEWAY, "{}", second.text());
    assert!(second.text().contains("access-denied"), "{}", second.text());

    let metrics = host.get("/metrics").await.text();
    let count = |function: &str, outcome: &str| {
        series_sum(
            &metrics,
            &format!(
                "lichen_outbound_tcp_connects_total{{function=\"{function}\",outcome=\"{outcome}\"}}"
            ),
        )
    };
    assert_eq!(count("granted", "ok"), 3.0);
    assert_eq!(count("ungranted", "refused"), 1.0);
    assert_eq!(count("other-port", "refused"), 1.0);
    assert!(
        count("by-name", "refused") >= 1.0,
        "each address of localhost refused"
    );
    // A name no grant names is refused at the lookup: no connect to count.
    assert_eq!(count("unnamed", "refused"), 0.0);
    assert_eq!(
        (count("limited", "ok"), count("limited", "limit")),
        (1.0, 1.0)
    );

    // Without a grant, no sockets at all: the policy's text is all it takes.
    let ungranted = host
        .admin(
            Method::PUT,
            "/v1/functions/granted/policy",
            format!("[config]\nredis = {at:?}\n").into_bytes(),
        )
        .await;
    assert_eq!(ungranted.status, StatusCode::OK, "{}", ungranted.text());
    common::eventually("the policy without a grant is in force", || async {
        let reply = call(&host, "granted", Method::GET, "greeting", "").await;
        reply.status == StatusCode::BAD_GATEWAY && reply.text().contains("access-denied")
    })
    .await;
    host.stop().await;
}
