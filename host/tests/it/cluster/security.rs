//! The cluster plane under attack: real hosts on loopback and a hostile
//! process beside them (this test) that speaks chitchat without the
//! secret, captures sealed datagrams and signed requests off the wire and
//! replays or alters them, and a rolling rotation of the secret under
//! traffic.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use chitchat::transport::{RecvOutcome, SendOutcome, Socket, Transport, UdpTransport};
use chitchat::{ChitchatConfig, ChitchatEnvelope, ChitchatId, ChitchatMessage};
use http::{Method, StatusCode};
use lichen_core::gossip::FunctionState;
use lichen_core::registry::{Entry, Version};

use super::{Node, SECRET, deploy_with_policy, three};
use crate::common::{self, Reply, eventually, send, series_sum, unix_ms};

const NEW_SECRET: &str = "the-next-test-cluster-secret-of-some-length";

/// Datagrams a host dropped for `reason`.
async fn rejected(node: &Node, reason: &str) -> f64 {
    series_sum(
        &node.metrics().await,
        &format!("lichen_gossip_rejected_total{{reason=\"{reason}\"}}"),
    )
}

/// What a host knows that gossip could change: its peers (id and API
/// address) and its registry entry of `function`.
async fn gossip_view(node: &Node, function: &str) -> (serde_json::Value, serde_json::Value) {
    let peers = node
        .admin(Method::GET, "/v1/peers", Vec::new())
        .await
        .json();
    let peers: Vec<(String, String)> = peers["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["node_id"].as_str().unwrap().to_string(),
                p["api"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let described = node
        .admin(
            Method::GET,
            &format!("/v1/functions/{function}"),
            Vec::new(),
        )
        .await
        .json();
    (
        serde_json::json!(peers),
        serde_json::json!([described["version"], described["versions"]]),
    )
}

/// Sends each datagram to `node`'s gossip port and waits until it counts
/// it as rejected for `reason`, one at a time: a burst could overflow the
/// socket's buffer on a loaded machine, and the kernel drops what does not
/// fit. One not counted within a few seconds is taken as dropped and sent
/// again (so a count may end above the datagrams sent, never below).
async fn deliver(datagrams: &[Vec<u8>], node: &Node, reason: &str) {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let started = std::time::Instant::now();
    for datagram in datagrams {
        let before = rejected(node, reason).await;
        'sent: loop {
            socket
                .send_to(datagram, node.gossip.as_str())
                .await
                .unwrap();
            let sent = std::time::Instant::now();
            while sent.elapsed() < Duration::from_secs(3) {
                if rejected(node, reason).await > before {
                    break 'sent;
                }
                assert!(
                    started.elapsed() < common::PATIENCE,
                    "datagrams not counted as {reason} within {:?}",
                    common::PATIENCE
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Chitchat's own messages as a node sends them, in plain text.
type Recorded = Arc<Mutex<Vec<(&'static str, Vec<u8>)>>>;

struct Recording(Recorded);

#[async_trait::async_trait]
impl Transport for Recording {
    async fn open(&self, addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let inner = UdpTransport.open(addr).await?;
        Ok(Box::new(RecordingSocket {
            inner,
            log: Arc::clone(&self.0),
        }))
    }
}

struct RecordingSocket {
    inner: Box<dyn Socket>,
    log: Recorded,
}

#[async_trait::async_trait]
impl Socket for RecordingSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        self.inner.local_addr()
    }

    async fn send(
        &mut self,
        to: SocketAddr,
        envelope: ChitchatEnvelope,
    ) -> anyhow::Result<SendOutcome> {
        let mut bytes = Vec::new();
        envelope.serialize(&mut bytes);
        let kind = match &envelope.message {
            ChitchatMessage::Syn { .. } => "syn",
            ChitchatMessage::SynAck { .. } => "synack",
            ChitchatMessage::Ack { .. } => "ack",
            ChitchatMessage::BadCluster => "badcluster",
        };
        self.log.lock().unwrap().push((kind, bytes));
        self.inner.send(to, envelope).await
    }

    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        self.inner.recv().await
    }
}

/// Two chitchat nodes without the secret gossiping with each other: one
/// posing as `victim` (its node id and gossip address, a later
/// generation) that publishes another API address and a version of
/// `function` nobody deployed, sets and deletes a key, and heartbeats. What
/// they sent each other, in plain chitchat.
async fn hostile_messages(victim: &Node, function: &str) -> Vec<(&'static str, Vec<u8>)> {
    let log: Recorded = Arc::default();
    let now = unix_ms();
    let mut entry = Entry::new(function);
    entry.deploy(Version {
        id: 99,
        sha256: "f".repeat(64),
        size: 1,
        stamp: now << 16,
        origin: victim.id.clone(),
        parent: None,
    });
    let forged = serde_json::to_string(&FunctionState {
        entry,
        serving: Some(99),
    })
    .unwrap();
    let node = |id: &str, advertise: SocketAddr, seeds: Vec<String>| {
        let listen = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let advertise = if advertise.port() == 0 {
            listen
        } else {
            advertise
        };
        ChitchatConfig {
            chitchat_id: ChitchatId::new(id.to_string(), now, advertise),
            cluster_id: "lichen".to_string(),
            gossip_interval: Duration::from_millis(50),
            listen_addr: listen,
            seed_nodes: seeds,
            failure_detector_config: Default::default(),
            marked_for_deletion_grace_period: Duration::from_secs(3600),
            catchup_callback: None,
            extra_liveness_predicate: None,
            protocol_version: chitchat::ProtocolVersion::V0,
        }
    };
    let posing = node(&victim.id, victim.gossip.parse().unwrap(), Vec::new());
    let posing_listen = posing.listen_addr.to_string();
    let kvs = vec![
        ("api".to_string(), "http://127.0.0.1:9".to_string()),
        ("load".to_string(), format!("64 0 {now}")),
        (format!("fn:{function}"), forged),
        ("fn:other".to_string(), "{}".to_string()),
    ];
    let a = chitchat::spawn_chitchat(posing, kvs, &Recording(Arc::clone(&log)))
        .await
        .unwrap();
    let b = chitchat::spawn_chitchat(
        node("evil", "127.0.0.1:0".parse().unwrap(), vec![posing_listen]),
        vec![("api".to_string(), "http://127.0.0.1:9".to_string())],
        &Recording(Arc::clone(&log)),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.with_chitchat(|c| c.self_node_state().delete("fn:other"))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = a.initiate_shutdown();
    let _ = b.initiate_shutdown();
    log.lock().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chitchat_messages_without_the_secret_change_nothing_and_are_counted() {
    let root = tempfile::tempdir().unwrap();
    let a = Node::start(root.path(), "a", &[], SECRET);
    let b = Node::start(root.path(), "b", &[&a], SECRET);
    deploy_with_policy(&a, &[&b], "hello", "[limits]\nconcurrency = 4\n").await;
    eventually("b serves hello", || async {
        b.post("/fn/hello", "").await.status == StatusCode::OK
    })
    .await;
    let before = gossip_view(&a, "hello").await;

    let messages = hostile_messages(&b, "hello").await;
    for kind in ["syn", "synack", "ack"] {
        assert!(
            messages.iter().any(|(k, _)| *k == kind),
            "the hostile nodes sent no {kind}"
        );
    }
    // Each also as a sealed datagram would look, under the key id read off
    // the wire, without the key: a made-up tag.
    let key_id = hex::decode(lichen_core::seal::Secret::new(SECRET).unwrap().id()).unwrap();
    let mut datagrams: Vec<Vec<u8>> = Vec::new();
    let mut posing = Vec::new();
    for (counter, (_, plain)) in messages.iter().enumerate() {
        datagrams.push(plain.clone());
        let mut sealed = b"LCG1".to_vec();
        sealed.extend_from_slice(&key_id);
        sealed.extend_from_slice(&[7; 8]);
        sealed.extend_from_slice(&(counter as u32 + 1).to_be_bytes());
        sealed.extend_from_slice(&unix_ms().to_be_bytes());
        sealed.extend_from_slice(plain);
        sealed.extend_from_slice(&[0; 16]);
        posing.push(sealed);
    }
    let (malformed, forged) = (
        rejected(&a, "malformed").await,
        rejected(&a, "forged").await,
    );
    deliver(&datagrams, &a, "malformed").await;
    deliver(&posing, &a, "forged").await;
    assert!(rejected(&a, "malformed").await - malformed >= datagrams.len() as f64);
    assert!(rejected(&a, "forged").await - forged >= posing.len() as f64);
    // A few gossip rounds later: nothing of it in a's view.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(gossip_view(&a, "hello").await, before);
    assert_eq!(a.peer_ids().await, ["b"]);
    assert_eq!(series_sum(&a.metrics().await, "lichen_peers_alive"), 1.0);
    assert_eq!(a.post("/fn/hello", "").await.status, StatusCode::OK);
    println!(
        "{} plain and {} posing datagrams, all rejected",
        datagrams.len(),
        posing.len()
    );
}

/// A UDP relay in front of `target` that records what passes, each way,
/// once delivered: (towards the target?, datagram).
pub(super) type Captured = Arc<Mutex<Vec<(bool, Vec<u8>)>>>;

pub(super) async fn recording_relay(
    target: SocketAddr,
) -> (SocketAddr, Captured, tokio::task::JoinHandle<()>) {
    let front = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let back = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = front.local_addr().unwrap();
    let captured: Captured = Arc::default();
    let log = Arc::clone(&captured);
    let task = tokio::spawn(async move {
        let (mut up, mut down) = (vec![0; 65_536], vec![0; 65_536]);
        let mut client = None;
        loop {
            tokio::select! {
                Ok((n, from)) = front.recv_from(&mut up) => {
                    client = Some(from);
                    if back.send_to(&up[..n], target).await.is_ok() {
                        log.lock().unwrap().push((true, up[..n].to_vec()));
                    }
                }
                Ok((n, _)) = back.recv_from(&mut down) => {
                    if let Some(client) = client
                        && front.send_to(&down[..n], client).await.is_ok()
                    {
                        log.lock().unwrap().push((false, down[..n].to_vec()));
                    }
                }
            }
        }
    });
    (addr, captured, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captured_gossip_replayed_or_altered_changes_nothing_and_is_counted() {
    let root = tempfile::tempdir().unwrap();
    let a = Node::start(root.path(), "a", &[], SECRET);
    let (relay, captured, task) = recording_relay(a.gossip.parse().unwrap()).await;
    let relay = relay.to_string();
    let b = Node::start_with(root.path(), "b", &[], SECRET, &["--peer", &relay]);
    deploy_with_policy(&a, &[&b], "hello", "[limits]\nconcurrency = 4\n").await;
    eventually("a and b see each other", || async {
        a.peer_ids().await == ["b"] && b.peer_ids().await == ["a"]
    })
    .await;
    eventually("the relay saw gossip both ways", || async {
        let captured = captured.lock().unwrap();
        captured.iter().filter(|(up, _)| *up).count() >= 3
            && captured.iter().filter(|(up, _)| !*up).count() >= 3
    })
    .await;
    task.abort();
    let _ = task.await;
    let captured = captured.lock().unwrap().clone();
    let to_a: Vec<Vec<u8>> = captured
        .iter()
        .filter(|(up, _)| *up)
        .map(|(_, d)| d.clone())
        .collect();
    let to_b: Vec<Vec<u8>> = captured
        .iter()
        .filter(|(up, _)| !*up)
        .map(|(_, d)| d.clone())
        .collect();
    eventually("b serves hello", || async {
        b.post("/fn/hello", "").await.status == StatusCode::OK
    })
    .await;
    let before = (
        gossip_view(&a, "hello").await,
        gossip_view(&b, "hello").await,
    );

    // Later, as they were.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (replayed_a, replayed_b) = (
        rejected(&a, "replayed").await,
        rejected(&b, "replayed").await,
    );
    deliver(&to_a, &a, "replayed").await;
    deliver(&to_b, &b, "replayed").await;
    assert!(rejected(&a, "replayed").await - replayed_a >= to_a.len() as f64);
    assert!(rejected(&b, "replayed").await - replayed_b >= to_b.len() as f64);

    // One bit flipped: in the message, in the tag, in the sending time.
    let forged = rejected(&a, "forged").await;
    let header = lichen_core::seal::HEADER_LEN;
    let flipped: Vec<Vec<u8>> = [header + 5, to_a[0].len() - 1, header - 1]
        .iter()
        .map(|&at| {
            let mut datagram = to_a[0].clone();
            datagram[at] ^= 0x10;
            datagram
        })
        .collect();
    deliver(&flipped, &a, "forged").await;
    assert!(rejected(&a, "forged").await - forged >= flipped.len() as f64);

    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        (
            gossip_view(&a, "hello").await,
            gossip_view(&b, "hello").await
        ),
        before
    );
    assert_eq!(series_sum(&a.metrics().await, "lichen_peers_alive"), 1.0);
    println!(
        "replayed {} datagrams to a and {} to b, altered {}: all rejected",
        to_a.len(),
        to_b.len(),
        flipped.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_with_another_secret_never_joins_and_its_gossip_is_counted() {
    let root = tempfile::tempdir().unwrap();
    let a = Node::start(root.path(), "a", &[], SECRET);
    let b = Node::start(root.path(), "b", &[&a], SECRET);
    let intruder = Node::start(root.path(), "x", &[&a, &b], "some-other-secret-entirely");
    eventually("a and b drop the intruder's gossip", || async {
        rejected(&a, "unknown_key").await >= 3.0 && rejected(&b, "unknown_key").await >= 3.0
    })
    .await;
    for node in [&a, &b] {
        let peers = node.peer_ids().await;
        assert!(!peers.contains(&"x".to_string()), "{}: {peers:?}", node.id);
    }
    assert_eq!(intruder.peer_ids().await, Vec::<String>::new());
}

/// One request a proxy took and never delivered.
#[derive(Clone)]
struct Stolen {
    method: Method,
    target: String,
    headers: Vec<(String, String)>,
    body: Bytes,
}

impl Stolen {
    /// Sends it to `url` as it was (its `Host` too), with `target` and
    /// `body` if given instead.
    async fn send_to(&self, url: &str, target: Option<&str>, body: Option<&[u8]>) -> Reply {
        self.send_with(url, target, body, &[]).await
    }

    /// The same, with `extra` headers added.
    async fn send_with(
        &self,
        url: &str,
        target: Option<&str>,
        body: Option<&[u8]>,
        extra: &[(&str, &str)],
    ) -> Reply {
        let mut headers: Vec<(&str, &str)> = self
            .headers
            .iter()
            .filter(|(name, _)| name.as_str() != "content-length")
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        headers.extend_from_slice(extra);
        send(
            self.method.clone(),
            &format!("{url}{}", target.unwrap_or(&self.target)),
            &headers,
            body.unwrap_or(&self.body).to_vec(),
        )
        .await
    }
}

/// An HTTP server that takes every request sent to it, keeps it, and
/// answers that it is busy (so the sender runs it elsewhere).
async fn stealing_proxy() -> (SocketAddr, Arc<Mutex<Vec<Stolen>>>) {
    use http_body_util::BodyExt;
    use hyper::body::Incoming;
    use hyper_util::rt::TokioIo;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stolen: Arc<Mutex<Vec<Stolen>>> = Arc::default();
    let keep = Arc::clone(&stolen);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let keep = Arc::clone(&keep);
            let service = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                let keep = Arc::clone(&keep);
                async move {
                    let (parts, body) = req.into_parts();
                    let body = body
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    keep.lock().unwrap().push(Stolen {
                        method: parts.method,
                        target: parts.uri.path_and_query().unwrap().to_string(),
                        headers: parts
                            .headers
                            .iter()
                            .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_string()))
                            .collect(),
                        body,
                    });
                    let response = http::Response::builder()
                        .status(StatusCode::SERVICE_UNAVAILABLE)
                        .header("x-lichen-busy", "1")
                        .body(http_body_util::Full::new(Bytes::from_static(
                            b"{\"error\":{\"code\":\"busy\",\"message\":\"busy\"}}",
                        )))
                        .unwrap();
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    (addr, stolen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_captured_peer_request_is_good_once_for_its_own_path_and_body() {
    let root = tempfile::tempdir().unwrap();
    // b is reached by its peers through a proxy that keeps what they send.
    let (proxy, stolen) = stealing_proxy().await;
    let proxy = proxy.to_string();
    let a = Node::start(root.path(), "a", &[], SECRET);
    let b = Node::start_with(root.path(), "b", &[&a], SECRET, &["--advertise", &proxy]);
    let private = "[access]\npublic = false\ntokens = [\"caller\"]\n[limits]\nconcurrency = 1\n";
    deploy_with_policy(&a, &[&b], "square", private).await;
    let caller = [("authorization", "Bearer caller")];
    eventually("b serves square", || async {
        send(
            Method::POST,
            &format!("{}/fn/square", b.url),
            &caller,
            b"3".to_vec(),
        )
        .await
        .status
            == StatusCode::OK
    })
    .await;
    eventually("a sees b serve square", || a.sees_serving(1, "square")).await;

    // A map on a: what a has no room for goes to b, through the proxy.
    let inputs: Vec<i64> = (0..40).collect();
    let body = serde_json::to_vec(&inputs).unwrap();
    let map = format!("{}/v1/functions/square/map", a.url);
    eventually("a forwards two map items to b", || async {
        let reply = send(Method::POST, &map, &caller, body.clone()).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        stolen.lock().unwrap().len() >= 2
    })
    .await;
    let stolen: Vec<Stolen> = stolen.lock().unwrap().clone();
    let (first, second) = (&stolen[0], &stolen[1]);
    assert!(
        first
            .headers
            .iter()
            .any(|(n, v)| n == "x-lichen-peer-signature" && !v.contains("body=-")),
        "a map item is signed with its body's digest"
    );
    assert!(!first.headers.iter().any(|(n, _)| n == "authorization"));

    // Another path, another body (no input of the map is 999): refused.
    first
        .send_to(&b.url, Some("/fn/square/other"), None)
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "peer_signature_invalid");
    // Another host than the one it was signed for (a, which serves square
    // too), or a header that changes its meaning added: refused.
    first
        .send_to(&a.url, None, None)
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "peer_signature_invalid");
    for extra in [
        ("x-lichen-forwarded-host", "evil.test"),
        (
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
        ("content-type", "text/plain"),
    ] {
        first
            .send_with(&b.url, None, None, &[extra])
            .await
            .assert_error(StatusCode::UNAUTHORIZED, "peer_signature_invalid");
    }
    first
        .send_to(&b.url, None, Some(b"999"))
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "peer_body_mismatch");
    // As it was: good once, never again.
    let delivered = second.send_to(&b.url, None, None).await;
    assert_eq!(delivered.status, StatusCode::OK, "{}", delivered.text());
    tokio::time::sleep(Duration::from_secs(1)).await;
    second
        .send_to(&b.url, None, None)
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "peer_request_replayed");

    // Forged without the secret, or with none at all: the private function
    // is not run through the internal route.
    let ran = "lichen_invocations_total{function=\"square\",outcome=\"ok\"}";
    let invocations = series_sum(&b.metrics().await, ran);
    let url = format!("{}/fn/square", b.url);
    let forged = common::peer_signature(
        "some-other-secret-entirely",
        "POST",
        &url,
        "b",
        &[("x-lichen-forwarded-by", "a")],
        Some(b"5"),
    );
    let old_token = "0".repeat(64);
    for (headers, code) in [
        (
            vec![
                ("x-lichen-forwarded-by", "a"),
                ("x-lichen-peer-signature", forged.as_str()),
            ],
            "peer_signature_invalid",
        ),
        (
            vec![("x-lichen-forwarded-by", "a")],
            "peer_signature_missing",
        ),
        (
            vec![
                ("x-lichen-forwarded-by", "a"),
                ("x-lichen-cluster-token", old_token.as_str()),
            ],
            "peer_signature_missing",
        ),
    ] {
        send(Method::POST, &url, &headers, b"5".to_vec())
            .await
            .assert_error(StatusCode::UNAUTHORIZED, code);
    }
    send(Method::POST, &url, &[], b"5".to_vec())
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
    // A good signature that names no body (`body=-`) carries none: a
    // capture of one could otherwise take any body.
    let carried = [("x-lichen-forwarded-by", "a")];
    let unsigned = common::peer_signature(SECRET, "POST", &url, "b", &carried, None);
    send(
        Method::POST,
        &url,
        &[
            ("x-lichen-forwarded-by", "a"),
            ("x-lichen-peer-signature", unsigned.as_str()),
        ],
        b"5".to_vec(),
    )
    .await
    .assert_error(StatusCode::UNAUTHORIZED, "peer_body_unsigned");
    assert_eq!(
        series_sum(&b.metrics().await, ran),
        invocations,
        "nothing ran"
    );
    let refused = b.metrics().await;
    assert!(
        series_sum(
            &refused,
            "lichen_peer_requests_refused_total{code=\"peer_request_replayed\"}"
        ) >= 1.0
    );
}

/// Peers of hosts that serve TLS fetch modules and forward over HTTPS,
/// checking certificates against the CA: one host trusts the chain in its
/// own certificate file, the other `--peer-ca`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_that_serve_tls_talk_https_to_each_other() {
    let root = tempfile::tempdir().unwrap();
    let ca = common::Ca::new();
    let ca_file = root.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let files = |id: &str, chain: bool| {
        let (cert, key) = ca.leaf(&["127.0.0.1"], id, false);
        let (cert_file, key_file) = (
            root.path().join(format!("{id}.crt")),
            root.path().join(format!("{id}.key")),
        );
        let cert = if chain {
            format!("{cert}{}", ca.pem())
        } else {
            cert
        };
        std::fs::write(&cert_file, cert).unwrap();
        std::fs::write(&key_file, key).unwrap();
        (
            cert_file.display().to_string(),
            key_file.display().to_string(),
        )
    };
    let (a_cert, a_key) = files("a", true);
    let (b_cert, b_key) = files("b", false);
    let ca_path = ca_file.display().to_string();
    let a = Node::start_with(
        root.path(),
        "a",
        &[],
        SECRET,
        &["--tls-cert", &a_cert, "--tls-key", &a_key],
    );
    let b = Node::start_with(
        root.path(),
        "b",
        &[&a],
        SECRET,
        &[
            "--tls-cert",
            &b_cert,
            "--tls-key",
            &b_key,
            "--peer-ca",
            &ca_path,
        ],
    );
    assert!(a.url.starts_with("https://"), "{}", a.url);
    let tls = TlsClient::new(&ca);
    let deployed = tls
        .send(
            &a.url,
            Method::PUT,
            "/v1/functions/hello",
            common::component("hello"),
        )
        .await;
    assert_eq!(
        deployed.0,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&deployed.1)
    );
    eventually(
        "b fetched hello from a over HTTPS and serves it",
        || async {
            tls.send(&b.url, Method::POST, "/fn/hello", Vec::new())
                .await
                .0
                == StatusCode::OK
        },
    )
    .await;
    let (_, peers) = tls.send(&b.url, Method::GET, "/v1/peers", Vec::new()).await;
    let peers: serde_json::Value = serde_json::from_slice(&peers).unwrap();
    assert_eq!(peers["peers"][0]["api"], a.url.as_str());
    let (_, metrics) = tls.send(&b.url, Method::GET, "/metrics", Vec::new()).await;
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(series_sum(&metrics, "lichen_module_fetches_total{outcome=\"ok\"}") >= 1.0);
}

/// An HTTPS client trusting the CA certificates in `roots` (PEM),
/// presenting `identity` (certificate chain and key, PEM) if given.
struct TlsClient {
    client: hyper_util::client::legacy::Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        http_body_util::Full<Bytes>,
    >,
}

impl TlsClient {
    fn new(ca: &common::Ca) -> TlsClient {
        TlsClient::with(&ca.pem(), None)
    }

    fn with(roots: &str, identity: Option<(&str, &str)>) -> TlsClient {
        use rustls::pki_types::pem::PemObject;
        let mut store = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(roots.as_bytes()) {
            store.add(cert.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(store);
        let config = match identity {
            None => builder.with_no_client_auth(),
            Some((chain, key)) => builder
                .with_client_auth_cert(
                    rustls::pki_types::CertificateDer::pem_slice_iter(chain.as_bytes())
                        .map(Result::unwrap)
                        .collect(),
                    rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
                )
                .unwrap(),
        };
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_only()
            .enable_http1()
            .build();
        TlsClient {
            client: hyper_util::client::legacy::Client::builder(
                hyper_util::rt::TokioExecutor::new(),
            )
            .build(connector),
        }
    }

    /// Sends with the admin token.
    async fn send(
        &self,
        url: &str,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> (StatusCode, Bytes) {
        let auth = format!("Bearer {}", super::TOKEN);
        self.request(url, method, path, &[("authorization", &auth)], body)
            .await
            .unwrap()
    }

    /// Sends with `headers`; an error if no answer came (a failed
    /// handshake, say).
    async fn request(
        &self,
        url: &str,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Result<(StatusCode, Bytes), String> {
        use http_body_util::BodyExt;
        let mut request = http::Request::builder()
            .method(method)
            .uri(format!("{url}{path}"));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request
            .body(http_body_util::Full::new(Bytes::from(body)))
            .unwrap();
        let response = tokio::time::timeout(common::PATIENCE, self.client.request(request))
            .await
            .unwrap()
            .map_err(|e| format!("{e:?}"))?;
        let status = response.status();
        Ok((
            status,
            response.into_body().collect().await.unwrap().to_bytes(),
        ))
    }

    /// A GET of `target` as a peer sends it, with `signature` if given.
    async fn peer_get(
        &self,
        url: &str,
        target: &str,
        signature: Option<&str>,
    ) -> Result<(StatusCode, Bytes), String> {
        let headers: Vec<(&str, &str)> = signature
            .map(|s| ("x-lichen-peer-signature", s))
            .into_iter()
            .collect();
        self.request(url, Method::GET, target, &headers, Vec::new())
            .await
    }

    async fn metrics(&self, url: &str) -> String {
        let (_, body) = self.send(url, Method::GET, "/metrics", Vec::new()).await;
        String::from_utf8_lossy(&body).into_owned()
    }
}

/// Runs `lichen ARGS`; its standard output, or a panic with its error.
fn lichen(args: &[&str]) -> Result<String, String> {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_lichen"))
        .args(args)
        .output()
        .unwrap();
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

/// Three hosts under mutual TLS, with the CA and certificates `lichen
/// cluster ca|cert` made: modules are fetched and a map's items forwarded
/// between them, and clients need no certificate. A peer request (signed
/// with the cluster secret) over a connection without a certificate is
/// `401 peer_certificate_required` and counted; with a certificate of
/// another CA the handshake fails; with one of the cluster's CA it still
/// needs its signature.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_mutual_tls_peers_share_work_and_a_peer_request_needs_the_cluster_certificate() {
    let root = tempfile::tempdir().unwrap();
    let path = |p: &str| root.path().join(p).display().to_string();
    let said = lichen(&["cluster", "ca", "--out", &path("ca")]).unwrap();
    assert!(said.contains("ca.crt"), "{said}");
    // Nothing is overwritten.
    let again = lichen(&["cluster", "ca", "--out", &path("ca")]).unwrap_err();
    assert!(again.contains("exists already"), "{again}");
    for id in ["a", "b", "c"] {
        lichen(&[
            "cluster",
            "cert",
            id,
            "--ca",
            &path("ca"),
            "--address",
            "127.0.0.1",
            "--address",
            "localhost",
            "--out",
            &path("certs"),
        ])
        .unwrap();
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for key in ["ca/ca.key", "certs/a.key"] {
            let mode = std::fs::metadata(root.path().join(key))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "{key} is readable by others: {mode:o}");
        }
    }
    let flags = |id: &str| {
        vec![
            "--tls-cert".to_string(),
            path(&format!("certs/{id}.crt")),
            "--tls-key".to_string(),
            path(&format!("certs/{id}.key")),
            "--peer-mtls".to_string(),
            "--peer-ca".to_string(),
            path("ca/ca.crt"),
        ]
    };
    let start = |id: &str, seeds: &[&Node]| {
        let flags = flags(id);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        Node::start_with(root.path(), id, seeds, SECRET, &flags)
    };
    let a = start("a", &[]);
    let b = start("b", &[&a]);
    let c = start("c", &[&a]);
    // A host with the secret but no certificate (plain HTTP): it joins
    // gossip, but no host under mutual TLS takes it for a peer or sends
    // it work.
    let x = Node::start(root.path(), "x", &[&a], SECRET);
    assert!(a.url.starts_with("https://"), "{}", a.url);

    let ca_pem = std::fs::read_to_string(root.path().join("ca/ca.crt")).unwrap();
    // A client without a certificate: deploys, calls, reads.
    let client = TlsClient::with(&ca_pem, None);
    let (status, body) = client
        .send(
            &a.url,
            Method::PUT,
            "/v1/functions/square",
            common::component("square"),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&body)
    );
    let (status, body) = client
        .send(
            &a.url,
            Method::PUT,
            "/v1/functions/square/policy",
            b"[limits]\nconcurrency = 1\n".to_vec(),
        )
        .await;
    assert!(status.is_success(), "{}", String::from_utf8_lossy(&body));
    for node in [&b, &c] {
        eventually(
            &format!(
                "{} fetched square over mutual TLS and has its policy",
                node.id
            ),
            || async {
                node.dir.join("policies/square.toml").exists()
                    && client
                        .request(&node.url, Method::POST, "/fn/square", &[], b"3".to_vec())
                        .await
                        .is_ok_and(|(status, body)| status == StatusCode::OK && &body[..] == b"9")
            },
        )
        .await;
    }
    eventually("a sees b and c serve square", || async {
        let (_, peers) = client
            .send(&a.url, Method::GET, "/v1/peers", Vec::new())
            .await;
        let peers: serde_json::Value = serde_json::from_slice(&peers).unwrap();
        let peers = peers["peers"].as_array().unwrap();
        peers.len() == 2
            && peers.iter().all(|p| {
                p["functions"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|f| f["name"] == "square")
            })
    })
    .await;

    // A map from a, one item at a time per host: b and c run some.
    let inputs: Vec<i64> = (0..300).collect();
    let (status, body) = client
        .send(
            &a.url,
            Method::POST,
            "/v1/functions/square/map",
            serde_json::to_vec(&inputs).unwrap(),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let results: serde_json::Value = serde_json::from_slice(&body).unwrap();
    for (i, result) in results.as_array().unwrap().iter().enumerate() {
        assert_eq!(result["status"], 200, "item {i}: {result}");
        assert_eq!(result["body"], (i * i) as u64, "item {i}");
    }
    let forwarded_to: Vec<f64> = futures::future::join_all([&b, &c].map(|node| async {
        series_sum(
            &client.metrics(&node.url).await,
            "lichen_invocations_total{function=\"square\"",
        )
    }))
    .await;
    assert!(
        forwarded_to.iter().sum::<f64>() > 2.0,
        "no map item ran on b or c: {forwarded_to:?}"
    );
    for node in [&b, &c] {
        let metrics = client.metrics(&node.url).await;
        assert!(
            series_sum(&metrics, "lichen_module_fetches_total{outcome=\"ok\"}") >= 1.0,
            "{} fetched no module",
            node.id
        );
    }

    // Peer requests from outside the cluster's CA.
    let sha = {
        let (_, list) = client
            .send(&a.url, Method::GET, "/v1/functions/square", Vec::new())
            .await;
        let list: serde_json::Value = serde_json::from_slice(&list).unwrap();
        list["sha256"].as_str().unwrap().to_string()
    };
    let target = format!("/v1/internal/modules/{sha}");
    let signed = |node: &Node| {
        common::peer_signature(
            SECRET,
            "GET",
            &format!("{}{target}", node.url),
            &node.id,
            &[],
            Some(b""),
        )
    };
    let refused_before = series_sum(
        &client.metrics(&b.url).await,
        "lichen_peer_requests_refused_total{code=\"peer_certificate_required\"}",
    );
    let signature = signed(&b);
    let (status, body) = client
        .peer_get(&b.url, &target, Some(&signature))
        .await
        .unwrap();
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "{}",
        String::from_utf8_lossy(&body)
    );
    let error: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(error["code"], "peer_certificate_required");
    let refused_after = series_sum(
        &client.metrics(&b.url).await,
        "lichen_peer_requests_refused_total{code=\"peer_certificate_required\"}",
    );
    assert_eq!(refused_after, refused_before + 1.0);

    // A certificate of another CA (for the same name) fails the handshake.
    let stranger = common::Ca::new();
    let (cert, key) = stranger.leaf(&["127.0.0.1"], "c", false);
    let outsider = TlsClient::with(&ca_pem, Some((&cert, &key)));
    let signature = signed(&b);
    let refused = outsider.peer_get(&b.url, &target, Some(&signature)).await;
    assert!(
        refused.is_err(),
        "a stranger's certificate was taken: {refused:?}"
    );

    // c's own pair: a member's connection, whose requests still need their
    // signature.
    let chain = std::fs::read_to_string(root.path().join("certs/c.crt")).unwrap();
    let key = std::fs::read_to_string(root.path().join("certs/c.key")).unwrap();
    let member = TlsClient::with(&ca_pem, Some((&chain, &key)));
    let (status, body) = member.peer_get(&b.url, &target, None).await.unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let error: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(error["code"], "peer_signature_missing");
    let signature = signed(&b);
    let (status, body) = member
        .peer_get(&b.url, &target, Some(&signature))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    assert_eq!(&body[..], &common::component("square")[..]);
    // The same request again, certificate and all: a replay.
    let (status, body) = member
        .peer_get(&b.url, &target, Some(&signature))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let error: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(error["code"], "peer_request_replayed");

    // x, with the secret and no certificate, was never a peer of a, b or c
    // (it sees them: gossip is sealed by the secret alone).
    eventually("x hears a, b and c", || async {
        x.peer_ids().await == ["a", "b", "c"]
    })
    .await;
    for node in [&a, &b, &c] {
        let (_, peers) = client
            .send(&node.url, Method::GET, "/v1/peers", Vec::new())
            .await;
        let peers: serde_json::Value = serde_json::from_slice(&peers).unwrap();
        let ids: Vec<&str> = peers["peers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["node_id"].as_str().unwrap())
            .collect();
        assert!(!ids.contains(&"x"), "{} lists x: {ids:?}", node.id);
    }
    drop(x);
}

/// Map calls sent without pause to the hosts in `up`, until `stop`:
/// every item counted, and every item that did not answer 200.
struct Traffic {
    up: Arc<Mutex<Vec<String>>>,
    in_flight: Arc<Mutex<Vec<String>>>,
    items: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

impl Traffic {
    fn start(urls: Vec<String>, workers: usize) -> (Traffic, Vec<tokio::task::JoinHandle<()>>) {
        let traffic = Traffic {
            up: Arc::new(Mutex::new(urls)),
            in_flight: Arc::default(),
            items: Arc::default(),
            failures: Arc::default(),
            stop: Arc::default(),
        };
        let inputs: Vec<i64> = (0..16).collect();
        let body = serde_json::to_vec(&inputs).unwrap();
        let tasks = (0..workers)
            .map(|worker| {
                let (up, in_flight, items, failures, stop) = (
                    Arc::clone(&traffic.up),
                    Arc::clone(&traffic.in_flight),
                    Arc::clone(&traffic.items),
                    Arc::clone(&traffic.failures),
                    Arc::clone(&traffic.stop),
                );
                let body = body.clone();
                tokio::spawn(async move {
                    let mut turn = worker;
                    while !stop.load(Ordering::Relaxed) {
                        let url = {
                            let up = up.lock().unwrap();
                            turn += 1;
                            let url = up[turn % up.len()].clone();
                            in_flight.lock().unwrap().push(url.clone());
                            url
                        };
                        let reply = send(
                            Method::POST,
                            &format!("{url}/v1/functions/square/map"),
                            &[],
                            body.clone(),
                        )
                        .await;
                        {
                            let mut in_flight = in_flight.lock().unwrap();
                            let at = in_flight.iter().position(|u| *u == url).unwrap();
                            in_flight.swap_remove(at);
                        }
                        items.fetch_add(16, Ordering::Relaxed);
                        let results = reply.json();
                        let ok = reply.status == StatusCode::OK
                            && results.as_array().is_some_and(|r| {
                                r.len() == 16 && r.iter().all(|item| item["status"] == 200)
                            });
                        if !ok {
                            failures.lock().unwrap().push(format!(
                                "{url}: {} {}",
                                reply.status,
                                reply.text()
                            ));
                        }
                    }
                })
            })
            .collect();
        (traffic, tasks)
    }

    /// Stops sending to `url`, and returns once nothing sent to it is
    /// still in flight.
    async fn take_out(&self, url: &str) {
        self.up.lock().unwrap().retain(|u| u != url);
        eventually(&format!("no call to {url} in flight"), || async {
            !self.in_flight.lock().unwrap().iter().any(|u| u == url)
        })
        .await;
    }

    fn put_in(&self, url: &str) {
        self.up.lock().unwrap().push(url.to_string());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_rotates_its_secret_one_host_at_a_time_without_a_failed_invocation() {
    let root = tempfile::tempdir().unwrap();
    let (a, b, c) = three(root.path()).await;
    deploy_with_policy(&a, &[&b, &c], "square", "[limits]\nconcurrency = 1\n").await;
    for node in [&a, &b, &c] {
        eventually(&format!("{} sees two peers serve square", node.id), || {
            node.sees_serving(2, "square")
        })
        .await;
    }
    let mut nodes = vec![a, b, c];
    let forwarded = |nodes: &[Node]| {
        let urls: Vec<String> = nodes.iter().map(|n| n.url.clone()).collect();
        async move {
            let mut total = 0.0;
            for url in urls {
                let metrics = send(Method::GET, &format!("{url}/metrics"), &[], Vec::new())
                    .await
                    .text();
                total += series_sum(&metrics, "lichen_forwarded_total");
            }
            total
        }
    };
    let (traffic, tasks) = Traffic::start(nodes.iter().map(|n| n.url.clone()).collect(), 3);

    // First every host accepts both and sends under the new one; then each
    // drops the old one.
    let steps: [(&str, Vec<&str>); 2] = [
        (NEW_SECRET, vec!["--cluster-secret-previous", SECRET]),
        (NEW_SECRET, vec![]),
    ];
    for (secret, extra) in &steps {
        for i in 0..nodes.len() {
            let (id, gossip, url) = (
                nodes[i].id.clone(),
                nodes[i].gossip.clone(),
                nodes[i].url.clone(),
            );
            traffic.take_out(&url).await;
            common::stop_gracefully(&mut nodes[i].child);
            let others: Vec<&Node> = nodes
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, n)| n)
                .collect();
            let node = Node::launch(root.path(), &id, &gossip, &others, secret, extra);
            eventually(
                &format!("{id} and its peers see each other again"),
                || async {
                    let mut all = node.peer_ids().await.len() == 2;
                    for other in &others {
                        all &= other.peer_ids().await.contains(&id);
                    }
                    all && node.sees_serving(2, "square").await
                },
            )
            .await;
            // Work still crosses between this host and the others, whichever
            // secret each holds.
            let before = forwarded(std::slice::from_ref(&node)).await;
            traffic.put_in(&node.url);
            eventually(&format!("{id} forwards under its new secret"), || async {
                forwarded(std::slice::from_ref(&node)).await > before
            })
            .await;
            nodes[i] = node;
        }
    }
    let total = forwarded(&nodes).await;
    traffic.stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    let failures = traffic.failures.lock().unwrap().clone();
    let items = traffic.items.load(Ordering::Relaxed);
    println!(
        "rotation: {items} invocations in map items, {} failed, {total} forwarded between hosts",
        failures.len()
    );
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(items > 0);
}
