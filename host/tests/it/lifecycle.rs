//! Stopping a host the way orchestrators do: SIGTERM, then a drain window
//! in which `/readyz` says 503 while everything is still served, then no
//! new connections, requests in flight finished, exit 0.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{component, eventually, send, spawn_lichen, try_send, write_policy};
use http::{Method, StatusCode};

/// The drain window of the test: wide, since the test's steps inside it
/// (noticing `/readyz`, stopping clients, starting a slow call) must fit in
/// it however loaded the machine is.
const DRAIN: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_without_losing_an_accepted_request() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // The slow call outlives the drain, and runs within the host's 30 s
    // shutdown grace after it.
    write_policy(&data, "probe", "[limits]\ntimeout = \"5m\"\n");
    let drain = format!("{}s", DRAIN.as_secs());
    let (mut child, url, _log) = spawn_lichen(&data, &["--drain", &drain]);
    let token = std::fs::read_to_string(data.join("admin-token")).unwrap();
    let auth = format!("Bearer {}", token.trim());
    for name in ["hello", "probe"] {
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
    let answered = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..3)
        .map(|_| {
            let (stop, answered) = (Arc::clone(&stop), Arc::clone(&answered));
            let url = format!("{url}/fn/hello");
            tokio::spawn(async move {
                let mut answers = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let reply = try_send(Method::GET, &url, Vec::new()).await;
                    answers.push((Instant::now(), reply.map(|r| r.status)));
                    answered.fetch_add(1, Ordering::Relaxed);
                }
                answers
            })
        })
        .collect();
    let answered_by = |count: usize| {
        let answered = Arc::clone(&answered);
        move || {
            let answered = Arc::clone(&answered);
            async move { answered.load(Ordering::Relaxed) >= count }
        }
    };
    eventually("the clients are served", answered_by(30)).await;

    let signalled = Instant::now();
    let before_signal = answered.load(Ordering::Relaxed);
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    // Not ready; alive and serving all the same (each answer is one).
    eventually("/readyz says draining", || async {
        let ready = get("/readyz").await.unwrap();
        let draining = ready.status == StatusCode::SERVICE_UNAVAILABLE;
        assert!(
            draining == ready.text().contains("draining"),
            "{}",
            ready.text()
        );
        draining
    })
    .await;
    assert_eq!(get("/healthz").await.unwrap().status, StatusCode::OK);
    // Clients that noticed stop sending well before the drain ends.
    eventually(
        "the clients are served while draining",
        answered_by(before_signal + 30),
    )
    .await;
    stop.store(true, Ordering::Relaxed);
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

    // A slow call sent late in the window: still running when the drain
    // ends, and answered all the same.
    let slow_ms = (DRAIN + Duration::from_secs(5)).as_millis();
    let slow = tokio::spawn({
        let url = format!("{url}/fn/probe/sleep?ms={slow_ms}");
        async move { try_send(Method::GET, &url, Vec::new()).await }
    });
    common::until_in_flight(&url, "probe", 1.0).await;
    assert!(
        signalled.elapsed() < DRAIN,
        "the test's steps took longer than the drain window"
    );

    // The drain is over: no new connections; the slow call goes on.
    let address = url.trim_start_matches("http://").to_string();
    eventually("the host stops accepting connections", || {
        let address = address.clone();
        async move { tokio::net::TcpStream::connect(address).await.is_err() }
    })
    .await;
    assert!(
        !slow.is_finished(),
        "the slow call ended before the drain did"
    );
    let slow = slow
        .await
        .unwrap()
        .expect("the request in flight is answered");
    assert_eq!(slow.status, StatusCode::OK, "{}", slow.text());

    let deadline = Instant::now() + common::PATIENCE;
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
    eventually("ready without its seed", || async {
        ready().await.status == StatusCode::OK
    })
    .await;
    child.kill().unwrap();
}
