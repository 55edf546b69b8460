//! Peer hosts: real `lichen serve` processes on loopback gossiping over UDP
//! and talking HTTP, so a host can be killed outright.

#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

use crate::common;

mod audit;
mod clock;
pub mod cron;
mod queue;
mod registry;
mod secrets;
mod security;
mod tokens;
mod traces;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{PATIENCE, Reply, component, distinct, eventually, send, series_sum};
use http::{Method, StatusCode};

const LICHEN: &str = env!("CARGO_BIN_EXE_lichen");
const SECRET: &str = "a-test-cluster-secret-of-some-length";
const TOKEN: &str = "cluster-test-token";
/// How long a "slow" call sleeps in its guest: long enough that calls sent
/// together are all still running when the last of them arrives, however
/// loaded the machine, and within the default 10 s deadline.
const SLOW_MS: u64 = 5000;

/// One `lichen serve` process in a cluster.
struct Node {
    id: String,
    url: String,
    gossip: String,
    dir: PathBuf,
    child: common::Spawned,
    /// Every line the host logged.
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Node {
    /// Starts a host that joins through `seeds` (gossip addresses).
    fn start(root: &Path, id: &str, seeds: &[&Node], secret: &str) -> Node {
        Node::start_with(root, id, seeds, secret, &[])
    }

    fn start_with(root: &Path, id: &str, seeds: &[&Node], secret: &str, extra: &[&str]) -> Node {
        // A free UDP port for gossip (chitchat advertises what it binds).
        let gossip = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .to_string();
        Node::launch(root, id, &gossip, seeds, secret, extra)
    }

    /// Starts the host `id` gossiping on `gossip` (its directory kept from
    /// an earlier run, if any).
    fn launch(
        root: &Path,
        id: &str,
        gossip: &str,
        seeds: &[&Node],
        secret: &str,
        extra: &[&str],
    ) -> Node {
        Node::launch_env(root, id, gossip, seeds, secret, extra, &[])
    }

    /// [`Node::launch`] with `env` set for the host.
    fn launch_env(
        root: &Path,
        id: &str,
        gossip: &str,
        seeds: &[&Node],
        secret: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Node {
        let gossip = gossip.to_string();
        let dir = root.join(id);
        std::fs::create_dir_all(dir.join("policies")).unwrap();
        let mut command = Command::new(LICHEN);
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.join("data"))
            .arg("--policies")
            .arg(dir.join("policies"))
            .args(["--gossip", &gossip, "--node-id", id])
            .args(["--gossip-interval-ms", "100"])
            .args(extra)
            .env("LICHEN_ADMIN_TOKEN", TOKEN)
            .env("LICHEN_CLUSTER_SECRET", secret)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for seed in seeds {
            command.args(["--peer", &seed.gossip]);
        }
        let mut child = command
            .spawn()
            .map(common::Spawned::new)
            .expect("starting lichen serve");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let log_id = id.to_string();
        let log: std::sync::Arc<std::sync::Mutex<Vec<String>>> = std::sync::Arc::default();
        let lines = std::sync::Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = lichen::server::listening_url(&line) {
                    let _ = tx.send(url);
                }
                if std::env::var_os("LICHEN_TEST_LOGS").is_some() {
                    eprintln!("[{log_id}] {line}");
                }
                lines.lock().unwrap().push(line);
            }
        });
        let url = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the host logs the address it listens on");
        Node {
            id: id.to_string(),
            url,
            gossip,
            dir,
            child,
            log,
        }
    }

    async fn admin(&self, method: Method, path: &str, body: Vec<u8>) -> Reply {
        let auth = format!("Bearer {TOKEN}");
        send(
            method,
            &format!("{}{path}", self.url),
            &[("authorization", &auth)],
            body,
        )
        .await
    }

    async fn post(&self, path: &str, body: &str) -> Reply {
        send(
            Method::POST,
            &format!("{}{path}", self.url),
            &[],
            body.as_bytes().to_vec(),
        )
        .await
    }

    async fn metrics(&self) -> String {
        send(
            Method::GET,
            &format!("{}/metrics", self.url),
            &[],
            Vec::new(),
        )
        .await
        .text()
    }

    /// Whether this host sees `count` peers serving `function`.
    async fn sees_serving(&self, count: usize, function: &str) -> bool {
        let peers = self
            .admin(Method::GET, "/v1/peers", Vec::new())
            .await
            .json();
        let serving = peers["peers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| {
                p["functions"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|f| f["name"] == function)
            })
            .count();
        serving == count
    }

    async fn peer_ids(&self) -> Vec<String> {
        let peers = self
            .admin(Method::GET, "/v1/peers", Vec::new())
            .await
            .json();
        let mut ids: Vec<String> = peers["peers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["node_id"].as_str().unwrap().to_string())
            .collect();
        ids.sort();
        ids
    }

    /// A module fetch from this host, as a peer holding `secret` makes it.
    async fn fetch_module(&self, sha256: &str, secret: &str) -> Reply {
        let url = format!("{}/v1/internal/modules/{sha256}", self.url);
        let signature = common::peer_signature(secret, "GET", &url, &self.id, &[], Some(b""));
        send(
            Method::GET,
            &url,
            &[("x-lichen-peer-signature", &signature)],
            Vec::new(),
        )
        .await
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Three hosts: `a` first, `b` and `c` joining through it; returns once
/// each sees the other two.
async fn three(root: &Path) -> (Node, Node, Node) {
    three_with(root, &[]).await
}

/// Two hosts, `a` and `b` joining through it, each started with `extra`
/// flags; returns once they see each other.
async fn two_with(root: &Path, extra: &[&str]) -> (Node, Node) {
    let a = Node::start_with(root, "a", &[], SECRET, extra);
    let b = Node::start_with(root, "b", &[&a], SECRET, extra);
    eventually("a and b see each other", || async {
        a.peer_ids().await == ["b"] && b.peer_ids().await == ["a"]
    })
    .await;
    (a, b)
}

/// [`three`], each host started with `extra` flags.
async fn three_with(root: &Path, extra: &[&str]) -> (Node, Node, Node) {
    let a = Node::start_with(root, "a", &[], SECRET, extra);
    let b = Node::start_with(root, "b", &[&a], SECRET, extra);
    let c = Node::start_with(root, "c", &[&a], SECRET, extra);
    for node in [&a, &b, &c] {
        eventually(&format!("{} sees two peers", node.id), || async {
            node.peer_ids().await.len() == 2
        })
        .await;
    }
    (a, b, c)
}

/// Three hosts like [`three`], sharing the key-value backend of one
/// `nats-server` (returned too: it stops when dropped).
async fn three_on_nats(root: &Path) -> (common::NatsServer, Node, Node, Node) {
    let nats = common::NatsServer::start(&root.join("nats"));
    let flags = on_nats(&nats.url);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let (a, b, c) = three_with(root, &flags).await;
    (nats, a, b, c)
}

/// The flags of a host whose key-value backend (and so its registry and
/// its triggers' NATS) is the NATS at `url`.
fn on_nats(url: &str) -> Vec<String> {
    [
        "--kv-backend",
        "nats",
        "--kv-nats-url",
        url,
        "--kv-nats-replicas",
        "1",
        // A loaded machine slows NATS down; a late answer is an answer.
        "--kv-nats-timeout",
        "60s",
    ]
    .map(String::from)
    .to_vec()
}

/// Who served each of `replies` (all 200), sorted: the peer named by
/// `x-lichen-served-by`, or `a` (the host called) without it.
fn served_by(replies: &[Reply]) -> Vec<String> {
    let mut served_by: Vec<String> = replies
        .iter()
        .map(|reply| {
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
            reply
                .headers
                .get("x-lichen-served-by")
                .map_or("a".to_string(), |v| v.to_str().unwrap().to_string())
        })
        .collect();
    served_by.sort();
    served_by
}

/// Deploys `function` (the fixture of that name) on `origin` with `policy`,
/// and waits until each of `peers` has the policy file.
async fn deploy_with_policy(origin: &Node, peers: &[&Node], function: &str, policy: &str) {
    deploy_fixture_with_policy(origin, peers, function, function, policy).await;
}

/// Deploys the fixture `fixture` as `function` on `origin` with `policy`,
/// and waits until each of `peers` has the policy file.
async fn deploy_fixture_with_policy(
    origin: &Node,
    peers: &[&Node],
    function: &str,
    fixture: &str,
    policy: &str,
) {
    let deployed = origin
        .admin(
            Method::PUT,
            &format!("/v1/functions/{function}"),
            component(fixture),
        )
        .await;
    assert_eq!(deployed.status, StatusCode::CREATED, "{}", deployed.text());
    origin
        .admin(
            Method::PUT,
            &format!("/v1/functions/{function}/policy"),
            policy.as_bytes().to_vec(),
        )
        .await;
    // As written, function tokens kept as their hashes.
    let hashed = lichen_core::policy::hash_access_tokens(policy);
    let policy = hashed.as_deref().unwrap_or(policy);
    for node in peers {
        eventually(&format!("{} has {function}'s policy", node.id), || async {
            std::fs::read_to_string(node.dir.join(format!("policies/{function}.toml")))
                .is_ok_and(|t| t == policy)
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploys_redeploys_and_deletes_reach_every_host() {
    let root = tempfile::tempdir().unwrap();
    let (a, b, c) = three(root.path()).await;

    let deployed = a
        .admin(Method::PUT, "/v1/functions/hello", component("hello"))
        .await;
    assert_eq!(deployed.status, StatusCode::CREATED, "{}", deployed.text());
    let started = Instant::now();
    eventually("c serves hello deployed on a", || async {
        c.post("/fn/hello", "").await.status == StatusCode::OK
    })
    .await;
    eprintln!("deploy on a -> 200 on c: {:?}", started.elapsed());
    let reply = c.post("/fn/hello", "").await;
    assert!(reply.text().contains("Hello"), "{}", reply.text());
    assert!(
        series_sum(
            &c.metrics().await,
            "lichen_module_fetches_total{outcome=\"ok\"}"
        ) >= 1.0,
        "c fetched the module from a peer"
    );

    // A new version on b: every host serves it, at the same version number.
    let v2 = distinct(&component("hello"), "v2");
    let redeployed = b.admin(Method::PUT, "/v1/functions/hello", v2).await;
    assert_eq!(redeployed.status, StatusCode::CREATED);
    let sha2 = redeployed.json()["sha256"].as_str().unwrap().to_string();
    for node in [&a, &b, &c] {
        eventually(&format!("{} serves v2", node.id), || async {
            let info = node
                .admin(Method::GET, "/v1/functions/hello", Vec::new())
                .await
                .json();
            info["sha256"] == sha2.as_str() && info["version"] == redeployed.json()["version"]
        })
        .await;
    }

    // A policy written on a reaches b's policy directory.
    let policy = "[limits]\nconcurrency = 3\n";
    let put = a
        .admin(
            Method::PUT,
            "/v1/functions/hello/policy",
            policy.as_bytes().to_vec(),
        )
        .await;
    assert_eq!(put.status, StatusCode::OK, "{}", put.text());
    eventually("the policy reaches b", || async {
        std::fs::read_to_string(b.dir.join("policies/hello.toml")).is_ok_and(|t| t == policy)
    })
    .await;

    // Deleted on c: gone everywhere, and it stays gone.
    let deleted = c
        .admin(Method::DELETE, "/v1/functions/hello", Vec::new())
        .await;
    assert_eq!(deleted.status, StatusCode::OK);
    for node in [&a, &b, &c] {
        eventually(&format!("hello is gone from {}", node.id), || async {
            node.post("/fn/hello", "").await.status == StatusCode::NOT_FOUND
        })
        .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for node in [&a, &b, &c] {
        let listed = node.admin(Method::GET, "/v1/functions", Vec::new()).await;
        assert_eq!(listed.json()["functions"], serde_json::json!([]));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_host_forwards_to_peers_with_room() {
    let root = tempfile::tempdir().unwrap();
    let (a, b, c) = three(root.path()).await;
    let policy = "[limits]\nconcurrency = 2\nqueue = 0\n";
    deploy_with_policy(&a, &[&b, &c], "probe", policy).await;
    eventually("a sees b and c serve probe", || a.sees_serving(2, "probe")).await;

    // Six slow calls at a, which runs two at once and queues none: the
    // cluster has six slots, so all six run.
    let calls = (0..6).map(|_| {
        let url = format!("{}/fn/probe/sleep?ms={SLOW_MS}", a.url);
        tokio::spawn(async move { send(Method::GET, &url, &[], Vec::new()).await })
    });
    let replies: Vec<Reply> = futures::future::join_all(calls)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(served_by(&replies), ["a", "a", "b", "b", "c", "c"]);
    let metrics = a.metrics().await;
    assert_eq!(series_sum(&metrics, "lichen_forwarded_total{"), 4.0);

    // A seventh while all six slots are taken: no host has room.
    let calls = (0..7).map(|_| {
        let url = format!("{}/fn/probe/sleep?ms={SLOW_MS}", a.url);
        tokio::spawn(async move { send(Method::GET, &url, &[], Vec::new()).await })
    });
    let statuses: Vec<StatusCode> = futures::future::join_all(calls)
        .await
        .into_iter()
        .map(|r| r.unwrap().status)
        .collect();
    assert_eq!(statuses.iter().filter(|s| **s == StatusCode::OK).count(), 6);
    let refused: Vec<_> = statuses.iter().filter(|s| **s != StatusCode::OK).collect();
    assert_eq!(refused, [&StatusCode::SERVICE_UNAVAILABLE]);

    // A forwarded request is authenticated: a client cannot pose as a peer.
    let posing = send(
        Method::GET,
        &format!("{}/fn/probe/sleep?ms=1", b.url),
        &[("x-lichen-forwarded-by", "a")],
        Vec::new(),
    )
    .await;
    posing.assert_error(StatusCode::UNAUTHORIZED, "peer_signature_missing");
}

/// A WASIp3 function moves between hosts as a p2 one does: its module by
/// hash, its invocations forwarded when the host they reach is full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_p3_function_is_shared_and_forwarded_like_a_p2_one() {
    let root = tempfile::tempdir().unwrap();
    let (a, b, c) = three(root.path()).await;
    let policy = "[limits]\nconcurrency = 1\nqueue = 0\n";
    deploy_fixture_with_policy(&a, &[&b, &c], "slow", "probe-p3", policy).await;
    eventually("a sees b and c serve slow", || a.sees_serving(2, "slow")).await;
    let described = b
        .admin(Method::GET, "/v1/functions/slow", Vec::new())
        .await
        .json();
    assert_eq!(described["abi"], "p3");

    let calls = (0..3).map(|_| {
        let url = format!("{}/fn/slow/sleep?ms={SLOW_MS}", a.url);
        tokio::spawn(async move { send(Method::GET, &url, &[], Vec::new()).await })
    });
    let replies: Vec<Reply> = futures::future::join_all(calls)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(served_by(&replies), ["a", "b", "c"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_map_spreads_over_hosts_and_survives_one_dying_running_no_item_twice() {
    let root = tempfile::tempdir().unwrap();
    let (a, mut b, c) = three(root.path()).await;
    // One at a time per host: the map takes long enough to kill b in it.
    deploy_with_policy(&a, &[&b, &c], "square", "[limits]\nconcurrency = 1\n").await;
    for node in [&b, &c] {
        eventually(&format!("{} serves square", node.id), || async {
            node.post("/fn/square", "3").await.status == StatusCode::OK
        })
        .await;
    }
    let inputs: Vec<i64> = (0..1000).collect();
    let body = serde_json::to_string(&inputs).unwrap();

    let check = |reply: &Reply| {
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        let results = reply.json();
        let results = results.as_array().unwrap();
        assert_eq!(results.len(), 1000);
        for (i, result) in results.iter().enumerate() {
            let i = i as i64;
            assert_eq!(result["status"], 200, "item {i}: {result}");
            assert_eq!(result["body"], i * i, "item {i}");
        }
    };
    check(&a.post("/v1/functions/square/map", &body).await);

    // Again, with b killed while the map runs.
    let map = {
        let (url, body) = (format!("{}/v1/functions/square/map", a.url), body.clone());
        tokio::spawn(async move { send(Method::POST, &url, &[], body.into_bytes()).await })
    };
    let before = Instant::now();
    while series_sum(
        &a.metrics().await,
        "lichen_invocations_total{function=\"square\"",
    ) < 1050.0
    {
        assert!(before.elapsed() < PATIENCE, "the second map did not start");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    b.kill();
    assert!(
        !map.is_finished(),
        "b was killed after the map had finished"
    );
    // The item b was running when it died may have run: it is answered
    // 502 and not run again elsewhere. Every other item is answered.
    let reply = map.await.unwrap();
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let results = reply.json();
    let results = results.as_array().unwrap();
    assert_eq!(results.len(), 1000);
    let mut lost = Vec::new();
    for (i, result) in results.iter().enumerate() {
        let i = i as i64;
        if result["status"] == 200 {
            assert_eq!(result["body"], i * i, "item {i}");
        } else {
            assert_eq!(result["status"], 502, "item {i}: {result}");
            let code = result["body"]["code"].as_str().unwrap();
            assert!(
                ["peer_failed", "response_failed"].contains(&code),
                "item {i}: {result}"
            );
            lost.push(i);
        }
    }
    // b ran one item at a time (concurrency 1, a forward never queues);
    // a few more may have been on their way to it when it died.
    assert!(lost.len() <= 4, "items lost with b: {lost:?}");

    // b leaves placement once the failure detector says so.
    eventually("a no longer lists b", || async {
        a.peer_ids().await == ["c"]
    })
    .await;
    assert_eq!(
        series_sum(&a.metrics().await, "lichen_peers_alive"),
        1.0,
        "a counts c alone"
    );

    // The CLI's map.
    let file = root.path().join("inputs.json");
    std::fs::write(&file, "[2, 3, \"x\"]").unwrap();
    let output = Command::new(LICHEN)
        .args(["map", "square"])
        .arg(&file)
        .args(["--url", &c.url, "--token", TOKEN])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let printed: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    for (i, squared) in [(0, 4), (1, 9)] {
        assert_eq!(printed[i]["status"], 200, "{printed}");
        assert_eq!(printed[i]["body"], squared, "{printed}");
        // Who ran it: c (called) or a, the two hosts left.
        let served_by = printed[i]["served_by"].as_str().unwrap();
        assert!(["a", "c"].contains(&served_by), "{printed}");
    }
    assert_eq!(printed[2]["status"], 400, "one bad item fails only itself");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_secret_a_host_cannot_join_or_fetch() {
    let root = tempfile::tempdir().unwrap();
    let a = Node::start(root.path(), "a", &[], SECRET);
    let deployed = a
        .admin(Method::PUT, "/v1/functions/hello", component("hello"))
        .await;
    let sha = deployed.json()["sha256"].as_str().unwrap().to_string();
    let intruder = Node::start(root.path(), "x", &[&a], "some-other-secret-entirely");
    let b = Node::start(root.path(), "b", &[&a], SECRET);
    eventually("b joins and serves hello", || async {
        b.post("/fn/hello", "").await.status == StatusCode::OK
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(a.peer_ids().await, ["b"]);
    assert_eq!(intruder.peer_ids().await, Vec::<String>::new());
    intruder
        .post("/fn/hello", "")
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");

    a.fetch_module(&sha, "some-other-secret-entirely")
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "peer_signature_invalid");
    let module = format!("{}/v1/internal/modules/{sha}", a.url);
    send(Method::GET, &module, &[], Vec::new())
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "peer_signature_missing");
    let fetched = a.fetch_module(&sha, SECRET).await;
    assert_eq!(fetched.status, StatusCode::OK);
    assert_eq!(fetched.body.as_ref(), component("hello").as_slice());
    for missing in ["0".repeat(64), "not-a-hash".to_string()] {
        a.fetch_module(&missing, SECRET)
            .await
            .assert_error(StatusCode::NOT_FOUND, "not_found");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_that_does_not_match_its_hash_is_refused() {
    let root = tempfile::tempdir().unwrap();
    // a advertises its API behind a proxy that swaps the modules it serves
    // for other bytes, as an attacker on the path would.
    let proxy = tampering_proxy(component("echo")).await;
    let advertise = proxy.to_string();
    let a = Node::start_with(root.path(), "a", &[], SECRET, &["--advertise", &advertise]);
    let deployed = a
        .admin(Method::PUT, "/v1/functions/hello", component("hello"))
        .await;
    let sha = deployed.json()["sha256"].as_str().unwrap().to_string();

    let b = Node::start(root.path(), "b", &[&a], SECRET);
    eventually("b fetched the module and refused it", || async {
        series_sum(
            &b.metrics().await,
            "lichen_module_fetches_total{outcome=\"hash_mismatch\"}",
        ) >= 1.0
    })
    .await;
    b.post("/fn/hello", "")
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    assert!(!b.dir.join(format!("data/modules/{sha}.wasm")).exists());
    assert_eq!(a.post("/fn/hello", "").await.status, StatusCode::OK);

    // A host does not hand out a module that no longer matches its hash on
    // its own disk either.
    std::fs::write(
        a.dir.join(format!("data/modules/{sha}.wasm")),
        component("echo"),
    )
    .unwrap();
    a.fetch_module(&sha, SECRET)
        .await
        .assert_error(StatusCode::INTERNAL_SERVER_ERROR, "internal");
}

/// An HTTP server on loopback that answers every module fetch with
/// `bytes`, and anything else with 502.
async fn tampering_proxy(bytes: Vec<u8>) -> std::net::SocketAddr {
    use hyper::body::Incoming;
    use hyper_util::rt::TokioIo;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let bytes = bytes::Bytes::from(bytes);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let bytes = bytes.clone();
            let service = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                let bytes = bytes.clone();
                async move {
                    let mut response = http::Response::new(http_body_util::Full::new(bytes));
                    if !req.uri().path().starts_with("/v1/internal/modules/") {
                        *response.status_mut() = StatusCode::BAD_GATEWAY;
                        *response.body_mut() = http_body_util::Full::default();
                    }
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_dying_mid_request_retries_only_what_may_run_twice() {
    let root = tempfile::tempdir().unwrap();
    let a = Node::start(root.path(), "a", &[], SECRET);
    // One peer killed for each of a GET, a POST, a map item and a cron
    // tick, and one left to check that nothing ran again on it.
    let mut others: Vec<Node> = ["b", "c", "d", "e", "f"]
        .iter()
        .map(|id| Node::start(root.path(), id, &[&a], SECRET))
        .collect();
    let policy = "[limits]\nconcurrency = 1\nqueue = 0\ntimeout = \"5m\"\n\n\
                  [[triggers.cron]]\nschedule = \"0 0 1 1 *\"\npath = \"/sleep?ms=5000\"\n";
    let peers: Vec<&Node> = others.iter().collect();
    deploy_with_policy(&a, &peers, "probe", policy).await;
    eventually("a sees five peers serve probe", || {
        a.sees_serving(5, "probe")
    })
    .await;

    // a's one slot is taken for the whole test (the call is dropped at
    // its end, which cancels it).
    let hold = {
        let url = format!("{}/fn/probe/sleep?ms={}", a.url, PATIENCE.as_millis());
        tokio::spawn(async move { send(Method::GET, &url, &[], Vec::new()).await })
    };
    eventually("a runs the long call", || async {
        series_sum(&a.metrics().await, "lichen_inflight{function=\"probe\"}") == 1.0
    })
    .await;

    // Sends one call through a, kills the peer it went to while it runs,
    // and returns the reply and the peer killed.
    async fn call_and_kill_its_peer(
        a: &Node,
        others: &mut [Node],
        method: Method,
    ) -> (Reply, String) {
        // Long enough to be seen running and killed however slow the
        // machine is.
        let url = format!("{}/fn/probe/sleep?ms=5000", a.url);
        send_and_kill_its_peer(others, method, url, Vec::new()).await
    }

    // Sends `body` to `url` on a and kills the peer that runs it.
    async fn send_and_kill_its_peer(
        others: &mut [Node],
        method: Method,
        url: String,
        body: Vec<u8>,
    ) -> (Reply, String) {
        let auth = format!("Bearer {TOKEN}");
        let call =
            tokio::spawn(
                async move { send(method, &url, &[("authorization", &auth)], body).await },
            );
        let started = Instant::now();
        loop {
            for node in others.iter_mut() {
                if node.child.try_wait().unwrap().is_none()
                    && series_sum(&node.metrics().await, "lichen_inflight{function=\"probe\"}")
                        == 1.0
                {
                    node.kill();
                    return (call.await.unwrap(), node.id.clone());
                }
            }
            assert!(
                started.elapsed() < PATIENCE,
                "the call never reached a peer"
            );
        }
    }

    // A GET is idempotent: sent once more to another peer.
    let (reply, killed) = call_and_kill_its_peer(&a, &mut others, Method::GET).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let served_by = reply.headers["x-lichen-served-by"].to_str().unwrap();
    assert_ne!(served_by, killed);

    // A POST is not: 502, and no other host ran it.
    let mut before = std::collections::HashMap::new();
    for node in others.iter().filter(|n| n.id != killed) {
        let count = series_sum(
            &node.metrics().await,
            "lichen_invocations_total{function=\"probe\"",
        );
        before.insert(node.id.clone(), count);
    }
    let (reply, second) = call_and_kill_its_peer(&a, &mut others, Method::POST).await;
    reply.assert_error(StatusCode::BAD_GATEWAY, "peer_failed");

    // A map item is not either: its result is 502.
    let (reply, third) = send_and_kill_its_peer(
        &mut others,
        Method::POST,
        format!("{}/v1/functions/probe/map?path=/sleep", a.url),
        b"[5000]".to_vec(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let item = &reply.json()[0];
    assert_eq!(item["status"], 502, "{item}");
    assert_eq!(item["body"]["code"], "peer_failed", "{item}");

    // Nor a cron tick (fired now, through the API): its run is 502.
    let (reply, fourth) = send_and_kill_its_peer(
        &mut others,
        Method::POST,
        format!("{}/v1/functions/probe/triggers/0/run", a.url),
        Vec::new(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["status"], 502, "{}", reply.text());

    tokio::time::sleep(Duration::from_millis(300)).await;
    let killed_all = [&killed, &second, &third, &fourth];
    let survivor = others
        .iter()
        .find(|n| !killed_all.contains(&&n.id))
        .unwrap();
    let after = series_sum(
        &survivor.metrics().await,
        "lichen_invocations_total{function=\"probe\"",
    );
    assert_eq!(
        after, before[&survivor.id],
        "the POST, the map item or the tick ran again on {}",
        survivor.id
    );
    assert!(!hold.is_finished(), "a's slot was free during the test");
    hold.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_back_from_the_dead_catches_up() {
    let root = tempfile::tempdir().unwrap();
    let a = Node::start(root.path(), "a", &[], SECRET);
    let mut b = Node::start(root.path(), "b", &[&a], SECRET);
    a.admin(Method::PUT, "/v1/functions/hello", component("hello"))
        .await;
    eventually("b serves hello", || async {
        b.post("/fn/hello", "").await.status == StatusCode::OK
    })
    .await;
    b.kill();

    // While b is down: hello deleted, square deployed.
    a.admin(Method::DELETE, "/v1/functions/hello", Vec::new())
        .await;
    a.admin(Method::PUT, "/v1/functions/square", component("square"))
        .await;
    let b = Node::start(root.path(), "b", &[&a], SECRET);
    eventually("b serves square and not hello", || async {
        b.post("/fn/square", "5").await.status == StatusCode::OK
            && b.post("/fn/hello", "").await.status == StatusCode::NOT_FOUND
    })
    .await;
    // And a did not get hello back from b's old record.
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.post("/fn/hello", "")
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_outlives_every_host_restarting() {
    let root = tempfile::tempdir().unwrap();
    let mut a = Node::start(root.path(), "a", &[], SECRET);
    let mut b = Node::start(root.path(), "b", &[&a], SECRET);
    a.admin(Method::PUT, "/v1/functions/hello", component("hello"))
        .await;
    eventually("b serves hello", || async {
        b.post("/fn/hello", "").await.status == StatusCode::OK
    })
    .await;
    // b goes down holding hello; a deletes it, then goes down too.
    b.kill();
    let deleted = a
        .admin(Method::DELETE, "/v1/functions/hello", Vec::new())
        .await;
    assert_eq!(deleted.status, StatusCode::OK, "{}", deleted.text());
    a.kill();
    assert!(record_of(&a, "hello")["entry"]["head"]["target"].is_null());

    // Both come back: only a's disk knows of the delete.
    let a = Node::start(root.path(), "a", &[], SECRET);
    let b = Node::start(root.path(), "b", &[&a], SECRET);
    eventually("b drops the hello it missed the delete of", || async {
        b.post("/fn/hello", "").await.status == StatusCode::NOT_FOUND
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.post("/fn/hello", "")
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");

    // Deployed again, the function is no longer remembered as deleted.
    a.admin(Method::PUT, "/v1/functions/hello", component("hello"))
        .await;
    eventually("b serves hello again", || async {
        b.post("/fn/hello", "").await.status == StatusCode::OK
    })
    .await;
    for node in [&a, &b] {
        let record = record_of(node, "hello");
        assert!(record["entry"]["head"]["target"].is_u64(), "{record}");
    }
}

/// The record of `function` on `node`'s disk.
fn record_of(node: &Node, function: &str) -> serde_json::Value {
    let path = node.dir.join(format!("data/functions/{function}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_remembered_by_an_earlier_host_newer_than_a_stored_function_removes_it() {
    let root = tempfile::tempdir().unwrap();
    let mut a = Node::start(root.path(), "a", &[], SECRET);
    a.admin(Method::PUT, "/v1/functions/hello", component("hello"))
        .await;
    a.admin(Method::PUT, "/v1/functions/square", component("square"))
        .await;
    a.kill();
    // A delete of hello later than its upload, as hosts wrote them before
    // records kept deletes: migrated at start.
    let later = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        + 1000;
    let tombstone = serde_json::json!({
        "name": "hello", "sha256": null, "version": 1, "policy": null,
        "timestamp_ms": later, "origin": "a",
    });
    std::fs::create_dir_all(a.dir.join("data/deleted")).unwrap();
    std::fs::write(a.dir.join("data/deleted/hello.json"), tombstone.to_string()).unwrap();

    let a = Node::start(root.path(), "a", &[], SECRET);
    eventually("hello is deleted at start", || async {
        a.post("/fn/hello", "").await.status == StatusCode::NOT_FOUND
    })
    .await;
    assert!(record_of(&a, "hello")["serving"].is_null());
    assert!(!a.dir.join("data/deleted").exists());
    assert_eq!(a.post("/fn/square", "3").await.text(), "9");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_file_edited_on_one_host_reaches_the_others() {
    let root = tempfile::tempdir().unwrap();
    let a = Node::start(root.path(), "a", &[], SECRET);
    let b = Node::start(root.path(), "b", &[&a], SECRET);
    a.admin(Method::PUT, "/v1/functions/hello", component("hello"))
        .await;
    eventually("b serves hello", || async {
        b.post("/fn/hello", "").await.status == StatusCode::OK
    })
    .await;
    let policy = "[limits]\nconcurrency = 5\n";
    std::fs::write(b.dir.join("policies/hello.toml"), policy).unwrap();
    // a writes the file, then puts it in force: both, in a while.
    eventually("a has the policy written on b's disk, in force", || async {
        let path = "/v1/functions/hello/policy";
        let in_force = a.admin(Method::GET, path, Vec::new()).await.json();
        in_force["in_force"]["limits"]["concurrency"] == 5
            && std::fs::read_to_string(a.dir.join("policies/hello.toml")).is_ok_and(|t| t == policy)
    })
    .await;

    // The file removed on b: a falls back to the defaults too (its file
    // says nothing), as b, without a file, does.
    std::fs::remove_file(b.dir.join("policies/hello.toml")).unwrap();
    eventually("a runs hello under the defaults, as b does", || async {
        let path = "/v1/functions/hello/policy";
        let on_a = a.admin(Method::GET, path, Vec::new()).await.json()["in_force"].clone();
        let on_b = b.admin(Method::GET, path, Vec::new()).await.json()["in_force"].clone();
        on_a == on_b && on_a["limits"]["concurrency"] != 5
    })
    .await;
    assert_eq!(
        std::fs::read_to_string(a.dir.join("policies/hello.toml")).unwrap(),
        ""
    );
    assert!(!b.dir.join("policies/hello.toml").exists());
}

/// Three slow calls at `a` to `function`, which runs one at a time and
/// queues none: who served each (`busy` for a 503 refusal).
async fn three_slow_calls(a: &Node, function: &str) -> Vec<String> {
    let calls = (0..3).map(|_| {
        let url = format!("{}/fn/{function}/sleep?ms={SLOW_MS}", a.url);
        tokio::spawn(async move { send(Method::GET, &url, &[], Vec::new()).await })
    });
    let mut outcomes: Vec<String> = futures::future::join_all(calls)
        .await
        .into_iter()
        .map(|reply| {
            let reply = reply.unwrap();
            match reply.status {
                StatusCode::SERVICE_UNAVAILABLE => "busy".to_string(),
                StatusCode::OK => reply
                    .headers
                    .get("x-lichen-served-by")
                    .map_or("a".to_string(), |v| v.to_str().unwrap().to_string()),
                other => panic!("{other}: {}", reply.text()),
            }
        })
        .collect();
    outcomes.sort();
    outcomes
}

/// A function with key-value stores runs only where its data is: hosts on
/// their own embedded stores never forward it (nor a map over it), while a
/// function without stores is forwarded as ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_with_local_stores_is_never_forwarded() {
    let root = tempfile::tempdir().unwrap();
    let (a, b, c) = three(root.path()).await;
    let with_stores = "[limits]\nconcurrency = 1\nqueue = 0\n[keyvalue]\nstores = [\"default\"]\n";
    deploy_fixture_with_policy(&a, &[&b, &c], "stateful", "probe", with_stores).await;
    deploy_fixture_with_policy(
        &a,
        &[&b, &c],
        "stateless",
        "probe",
        "[limits]\nconcurrency = 1\nqueue = 0\n",
    )
    .await;
    eventually("a sees b and c serve both", || async {
        a.sees_serving(2, "stateful").await && a.sees_serving(2, "stateless").await
    })
    .await;
    let peers = a.admin(Method::GET, "/v1/peers", Vec::new()).await.json();
    assert_eq!(peers["kv"], "local:a");
    let mut kvs: Vec<&str> = peers["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["kv"].as_str().unwrap())
        .collect();
    kvs.sort_unstable();
    assert_eq!(kvs, ["local:b", "local:c"]);

    assert_eq!(three_slow_calls(&a, "stateless").await, ["a", "b", "c"]);
    assert_eq!(
        three_slow_calls(&a, "stateful").await,
        ["a", "busy", "busy"]
    );
}

/// Hosts on one NATS cluster see the same stores, so a function with
/// stores is forwarded between them like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_with_shared_stores_is_forwarded_within_its_nats_cluster() {
    let root = tempfile::tempdir().unwrap();
    let (_nats, a, b, c) = three_on_nats(root.path()).await;
    let with_stores = "[limits]\nconcurrency = 1\nqueue = 0\n[keyvalue]\nstores = [\"default\"]\n";
    deploy_fixture_with_policy(&a, &[&b, &c], "stateful", "probe", with_stores).await;
    eventually("a sees b and c serve it", || a.sees_serving(2, "stateful")).await;
    let peers = a.admin(Method::GET, "/v1/peers", Vec::new()).await.json();
    let kv = peers["kv"].as_str().unwrap().to_string();
    assert!(kv.starts_with("nats:"), "{kv}");
    assert!(
        peers["peers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["kv"] == kv.as_str()),
        "{peers}"
    );
    assert_eq!(three_slow_calls(&a, "stateful").await, ["a", "b", "c"]);
}

/// A host joins through a host name, as a Kubernetes headless service is
/// given: `--peer localhost:PORT`, resolved by gossip, and a seed that
/// does not resolve at start is only a warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_joins_through_a_host_name() {
    let root = tempfile::tempdir().unwrap();
    let a = Node::start(root.path(), "a", &[], SECRET);
    let port = a.gossip.rsplit_once(':').unwrap().1;
    let by_name = format!("localhost:{port}");
    let b = Node::start_with(
        root.path(),
        "b",
        &[],
        SECRET,
        &["--peer", &by_name, "--peer", "nowhere.invalid"],
    );
    for (node, other) in [(&a, "b"), (&b, "a")] {
        eventually(&format!("{} sees {other}", node.id), || async {
            node.peer_ids().await == [other]
        })
        .await;
    }
    // The status page's numbers list the peer too.
    let status = a.admin(Method::GET, "/v1/status", Vec::new()).await.json();
    assert_eq!(status["cluster"]["node_id"], "a");
    assert_eq!(status["cluster"]["peers"][0]["node_id"], "b");
    assert_eq!(status["cluster"]["peers"][0]["alive"], true);
}

/// A rollback is a registry change like a deploy: every peer makes the
/// same earlier version active.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_reaches_every_peer() {
    let root = tempfile::tempdir().unwrap();
    let a = Node::start(root.path(), "a", &[], SECRET);
    let b = Node::start(root.path(), "b", &[&a], SECRET);
    let says = |node: &Node| {
        let url = format!("{}/fn/app", node.url);
        async move { send(Method::POST, &url, &[], b"ping".to_vec()).await.text() }
    };
    let first = a
        .admin(Method::PUT, "/v1/functions/app", component("hello"))
        .await;
    eventually("b serves hello", || async {
        says(&b).await.contains("Hello")
    })
    .await;
    a.admin(Method::PUT, "/v1/functions/app", component("echo"))
        .await;
    eventually("b serves echo", || async {
        says(&b).await.contains("ping")
    })
    .await;
    let back = a
        .admin(Method::POST, "/v1/functions/app/rollback", Vec::new())
        .await;
    assert_eq!(back.status, StatusCode::OK, "{}", back.text());
    eventually("b serves hello again", || async {
        says(&b).await.contains("Hello")
    })
    .await;
    let described = b.admin(Method::GET, "/v1/functions/app", Vec::new()).await;
    assert_eq!(described.json()["version"], first.json()["version"]);
}

/// The gradient-descent example (`lichen train` over `functions/linreg`) on
/// three hosts sharing a NATS key-value backend: each step's items spread
/// over the hosts, and a host killed mid-training costs retries, not the
/// result: the run ends on the same theta as one without the kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn training_spreads_over_hosts_and_survives_one_dying() {
    use lichen::train::{Settings, train};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let root = tempfile::tempdir().unwrap();
    let (_nats, a, b, mut c) = three_on_nats(root.path()).await;
    let policy = std::fs::read_to_string(common::repo_root().join("policies/linreg.toml")).unwrap();
    deploy_with_policy(&a, &[&b, &c], "linreg", &policy).await;
    eventually("a sees b and c serve linreg", || {
        a.sees_serving(2, "linreg")
    })
    .await;
    let target = lichen::client::Target {
        url: a.url.clone(),
        token: TOKEN.to_string(),
        ca_cert: None,
    };
    let settings = Settings {
        shards: 8,
        rows: 300,
        steps: 40,
        ..Settings::default()
    };

    let calm = train(&target, &settings, |_| {}).await.unwrap();
    let hosts: BTreeSet<&String> = calm.steps.iter().flat_map(|s| s.served_by.keys()).collect();
    assert!(hosts.len() >= 2, "items served only by {hosts:?}");
    assert!(calm.distance < 0.05, "{calm:?}");

    // Again on the data already in the shared store, killing c once the
    // run is under way.
    let step = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&step);
    let again = Settings {
        load: false,
        ..settings
    };
    let run = tokio::spawn(async move {
        train(&target, &again, |s| seen.store(s.step, Ordering::SeqCst)).await
    });
    let started = Instant::now();
    while step.load(Ordering::SeqCst) < 5 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "training stalled"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    c.kill();
    let killed = run.await.unwrap().unwrap();
    assert_eq!(killed.steps.len(), 40);
    for (x, y) in killed.theta.iter().zip(&calm.theta) {
        assert!(
            (x - y).abs() <= 1e-12 * y.abs().max(1.0),
            "{:?} against {:?}",
            killed.theta,
            calm.theta
        );
    }
    for s in &killed.steps {
        println!("{}", lichen::train::step_line(s));
    }
    // After the kill only a and b serve.
    let last = &killed.steps[39];
    assert!(!last.served_by.contains_key("c"), "{last:?}");
    drop(b);
}
