//! Stopping a host the way orchestrators do: SIGTERM, then a drain window
//! in which `/readyz` says 503 while everything is still served, then no
//! new connections, requests in flight finished, exit 0.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{component, send, spawn_lichen, try_send};
use http::{Method, StatusCode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_without_losing_an_accepted_request() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (mut child, url, _log) = spawn_lichen(&data, &["--drain", "2s"]);
    let token = std::fs::read_to_string(data.join("admin-token")).unwrap();
    let auth = format!("Bearer {}", token.trim());
    for name in ["hello", "fib"] {
        let deployed = send(
            Method::PUT,
            &format!("{url}/v1/functions/{name}"),
            &[("authorization", &auth)],
            component(name),
        )
        .await;
        assert_eq!(deployed.status, StatusCode::CREATED, "{}", deployed.text());
    }
    let get = |path: &str| {
        let url = format!("{url}{path}");
        async move { try_send(Method::GET, &url, Vec::new()).await }
    };
    assert_eq!(get("/readyz").await.unwrap().status, StatusCode::OK);

    // A steady stream of requests from three clients, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..3)
        .map(|_| {
            let (stop, url) = (Arc::clone(&stop), format!("{url}/fn/hello"));
            tokio::spawn(async move {
                let mut answers = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let reply = try_send(Method::GET, &url, Vec::new()).await;
                    answers.push((Instant::now(), reply.map(|r| r.status)));
                }
                answers
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let signalled = Instant::now();
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    // Not ready at once; alive and serving all the same.
    loop {
        let ready = get("/readyz").await.unwrap();
        if ready.status == StatusCode::SERVICE_UNAVAILABLE {
            assert!(ready.text().contains("draining"), "{}", ready.text());
            break;
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(1),
            "/readyz still {} a second after SIGTERM",
            ready.status
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(get("/healthz").await.unwrap().status, StatusCode::OK);

    // Clients that noticed stop sending well before the drain ends; a slow
    // request sent late in the window is still running when it does.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    let slow = tokio::spawn({
        let url = format!("{url}/fn/fib?n=40");
        async move { try_send(Method::GET, &url, Vec::new()).await }
    });
    let mut after_signal = 0;
    for client in clients {
        for (at, status) in client.await.unwrap() {
            assert_eq!(status, Some(StatusCode::OK), "an accepted request was lost");
            if at > signalled {
                after_signal += 1;
            }
        }
    }
    assert!(after_signal > 0, "nothing was served while draining");

    // The drain is over: no new connections; the slow request (about a
    // second of work) finishes.
    while signalled.elapsed() < Duration::from_millis(2500) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let address = url.trim_start_matches("http://");
    assert!(
        tokio::net::TcpStream::connect(address).await.is_err(),
        "the host still accepts connections after its drain"
    );
    let slow = slow
        .await
        .unwrap()
        .expect("the request in flight is answered");
    assert_eq!(slow.status, StatusCode::OK);
    assert_eq!(slow.json()["fib"], 102334155);

    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the host did not exit");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        status.success(),
        "the host exits 0 after draining, got {status}"
    );
}

/// A cluster member is not ready before it has heard from the cluster: a
/// first host whose seed is not up says so until its rounds run out, then
/// serves on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_member_is_ready_once_it_has_heard_from_the_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let free_udp = || {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.local_addr().unwrap().to_string()
    };
    let (gossip, absent_seed) = (free_udp(), free_udp());
    let (mut child, url, _log) = spawn_lichen(
        &data,
        &[
            "--gossip",
            &gossip,
            "--peer",
            &absent_seed,
            "--gossip-interval-ms",
            "1000",
            "--cluster-secret",
            "a cluster secret long enough",
        ],
    );
    let ready = || {
        let url = format!("{url}/readyz");
        async move { try_send(Method::GET, &url, Vec::new()).await.unwrap() }
    };
    let first = ready().await;
    assert_eq!(first.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(first.text().contains("gossip"), "{}", first.text());
    let deadline = Instant::now() + Duration::from_secs(20);
    while ready().await.status != StatusCode::OK {
        assert!(Instant::now() < deadline, "never ready without its seed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    child.kill().unwrap();
}
