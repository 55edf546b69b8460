//! Every limit and grant of a policy, driven by real guests (`probe`, `trap`,
//! `echo`, built from functions/) through real HTTP against a real host;
//! each test runs once with the WASIp2 build of its guest and once (`_p3`)
//! with the WASIp3 build of the same source.
#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

use crate::common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{
    PATIENCE, Reply, TestHost, component, eventually, host_with, send, test_config,
    until_in_flight, write_policy,
};
use http::{Method, StatusCode};
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long a "slow" call sleeps in its guest: long enough to still be
/// running when the test's next request arrives, however loaded the
/// machine, and within the default 10 s deadline.
const SLOW_MS: u64 = 5000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_loop_and_a_blocked_host_call_end_at_the_deadline() {
    an_endless_loop_and_a_blocked_host_call_end_at_the_deadline_with("probe").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_loop_and_a_blocked_host_call_end_at_the_deadline_p3() {
    an_endless_loop_and_a_blocked_host_call_end_at_the_deadline_with("probe-p3").await;
}

async fn an_endless_loop_and_a_blocked_host_call_end_at_the_deadline_with(fixture: &str) {
    let dir = tempfile::tempdir().unwrap();
    write_policy(dir.path(), "probe", "[limits]\ntimeout = \"1s\"\n");
    let host = host_with(dir.path(), &[("probe", fixture)]).await;
    for path in ["/fn/probe/spin", "/fn/probe/sleep?ms=60000"] {
        let started = Instant::now();
        let reply = host.get(path).await;
        assert_eq!(
            reply.status,
            StatusCode::GATEWAY_TIMEOUT,
            "{path}: {}",
            reply.text()
        );
        assert_eq!(reply.code(), "timeout");
        // Stopped by the 1 s deadline, not by the guest's own end (a
        // minute's sleep, or never): a bound far from both.
        let took = started.elapsed();
        assert!(took < Duration::from_secs(30), "{path} took {took:?}");
        assert_eq!(host.get("/fn/probe/").await.text(), "probe\n");
    }
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runaway_recursion_is_a_500() {
    runaway_recursion_is_a_500_with("probe").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runaway_recursion_is_a_500_p3() {
    runaway_recursion_is_a_500_with("probe-p3").await;
}

async fn runaway_recursion_is_a_500_with(fixture: &str) {
    let dir = tempfile::tempdir().unwrap();
    let host = host_with(dir.path(), &[("probe", fixture)]).await;
    let reply = host.get("/fn/probe/recurse").await;
    reply.assert_error(StatusCode::INTERNAL_SERVER_ERROR, "trap");
    assert!(reply.text().contains("stack"), "{}", reply.text());
    assert_eq!(host.get("/fn/probe/").await.status, StatusCode::OK);
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_and_response_bodies_are_bounded() {
    request_and_response_bodies_are_bounded_with("echo").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_and_response_bodies_are_bounded_p3() {
    request_and_response_bodies_are_bounded_with("echo-p3").await;
}

async fn request_and_response_bodies_are_bounded_with(fixture: &str) {
    let dir = tempfile::tempdir().unwrap();
    write_policy(
        dir.path(),
        "echo",
        "[limits]\nrequest_body = \"1KiB\"\nresponse_body = \"2KiB\"\n",
    );
    let host = host_with(dir.path(), &[("echo", fixture)]).await;
    let url = format!("{}/fn/echo", host.url);

    let fits = send(Method::POST, &url, &[], vec![b'a'; 512]).await;
    assert_eq!(fits.status, StatusCode::OK);

    // Declared too large: refused before the guest runs.
    let declared = send(Method::POST, &url, &[], vec![b'a'; 2048]).await;
    assert_eq!(declared.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(declared.code(), "too_large");

    // Streamed without a length: cut while streaming.
    let chunks: Vec<Result<http_body::Frame<Bytes>, Infallible>> = (0..4)
        .map(|_| Ok(http_body::Frame::data(Bytes::from(vec![b'b'; 600]))))
        .collect();
    let body = http_body_util::StreamBody::new(futures::stream::iter(chunks));
    let request = http::Request::post(&url).body(body).unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);

    // The echo of a 1000-byte body is over 2 KiB of JSON: cut off, so the
    // client cannot take it for a whole response.
    let big_echo = http::Request::post(&url)
        .header("x-pad", "p".repeat(1500))
        .body(Full::new(Bytes::from(vec![b'c'; 1000])))
        .unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    // Cut before the head went out, the request fails; after, the body does.
    if let Ok(response) = client.request(big_echo).await {
        let read = http_body_util::BodyExt::collect(response.into_body()).await;
        assert!(
            read.is_err(),
            "a response over the limit must not arrive whole"
        );
    }
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_concurrency_and_queue_requests_get_503_with_retry_after() {
    past_concurrency_and_queue_requests_get_503_with_retry_after_with("probe").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_concurrency_and_queue_requests_get_503_with_retry_after_p3() {
    past_concurrency_and_queue_requests_get_503_with_retry_after_with("probe-p3").await;
}

async fn past_concurrency_and_queue_requests_get_503_with_retry_after_with(fixture: &str) {
    let dir = tempfile::tempdir().unwrap();
    write_policy(
        dir.path(),
        "probe",
        "[limits]\nconcurrency = 2\nqueue = 0\n",
    );
    let host = host_with(dir.path(), &[("probe", fixture)]).await;
    let url = format!("{}/fn/probe/sleep?ms={SLOW_MS}", host.url);
    let slow =
        |url: String| tokio::spawn(async move { send(Method::GET, &url, &[], Vec::new()).await });
    let first = slow(url.clone());
    let second = slow(url.clone());
    until_in_flight(&host.url, "probe", 2.0).await;
    let third = send(Method::GET, &url, &[], Vec::new()).await;
    assert_eq!(
        third.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        third.text()
    );
    assert_eq!(third.code(), "busy");
    assert_eq!(third.headers["retry-after"], "1");
    assert_eq!(first.await.unwrap().status, StatusCode::OK);
    assert_eq!(second.await.unwrap().status, StatusCode::OK);
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_request_waits_for_a_slot() {
    a_queued_request_waits_for_a_slot_with("probe").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_request_waits_for_a_slot_p3() {
    a_queued_request_waits_for_a_slot_with("probe-p3").await;
}

async fn a_queued_request_waits_for_a_slot_with(fixture: &str) {
    let dir = tempfile::tempdir().unwrap();
    write_policy(
        dir.path(),
        "probe",
        "[limits]\nconcurrency = 1\nqueue = 1\n",
    );
    let host = host_with(dir.path(), &[("probe", fixture)]).await;
    let url = format!("{}/fn/probe/sleep?ms=500", host.url);
    let first = {
        let url = url.clone();
        tokio::spawn(async move { send(Method::GET, &url, &[], Vec::new()).await })
    };
    until_in_flight(&host.url, "probe", 1.0).await;
    let second = send(Method::GET, &url, &[], Vec::new()).await;
    assert_eq!(second.status, StatusCode::OK);
    assert_eq!(first.await.unwrap().status, StatusCode::OK);
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_vars_are_visible_only_when_granted() {
    env_vars_are_visible_only_when_granted_with("probe").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_vars_are_visible_only_when_granted_p3() {
    env_vars_are_visible_only_when_granted_with("probe-p3").await;
}

async fn env_vars_are_visible_only_when_granted_with(fixture: &str) {
    let dir = tempfile::tempdir().unwrap();
    write_policy(dir.path(), "granted", "[env]\nGREETING = \"hello\"\n");
    let host = host_with(dir.path(), &[("granted", fixture), ("plain", fixture)]).await;
    assert_eq!(
        host.get("/fn/granted/env?name=GREETING").await.text(),
        "hello"
    );
    let all = host.get("/fn/granted/env-all").await.json();
    assert_eq!(all, serde_json::json!([["GREETING", "hello"]]));
    let plain = host.get("/fn/plain/env?name=GREETING").await;
    assert_eq!(plain.status, StatusCode::NOT_FOUND);
    // Nothing of the host's own environment leaks in.
    assert!(std::env::var("PATH").is_ok());
    assert_eq!(
        host.get("/fn/plain/env-all").await.json(),
        serde_json::json!([])
    );
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preopened_files_are_read_only_and_cannot_be_escaped() {
    preopened_files_are_read_only_and_cannot_be_escaped_with("probe").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preopened_files_are_read_only_and_cannot_be_escaped_p3() {
    preopened_files_are_read_only_and_cannot_be_escaped_with("probe-p3").await;
}

async fn preopened_files_are_read_only_and_cannot_be_escaped_with(fixture: &str) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("shared/hello");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("greeting.txt"), "hi from a file").unwrap();
    std::fs::write(dir.path().join("shared/secret.txt"), "not for guests").unwrap();
    write_policy(
        dir.path(),
        "probe",
        "[files]\n\"/data\" = \"shared/hello\"\n",
    );
    let host = host_with(dir.path(), &[("probe", fixture), ("other", fixture)]).await;

    assert_eq!(
        host.get("/fn/probe/read?path=/data/greeting.txt")
            .await
            .text(),
        "hi from a file"
    );
    assert_eq!(
        host.get("/fn/probe/list?path=/data").await.json(),
        serde_json::json!(["greeting.txt"])
    );
    for attempt in [
        "/fn/probe/write?path=/data/greeting.txt",
        "/fn/probe/truncate?path=/data/greeting.txt",
        "/fn/probe/create?path=/data/new.txt",
        "/fn/probe/read?path=/data/../secret.txt",
        "/fn/probe/read?path=/data/../../shared/secret.txt",
        "/fn/probe/read?path=/etc/passwd",
    ] {
        let reply = host.get(attempt).await;
        assert_eq!(
            reply.status,
            StatusCode::FORBIDDEN,
            "{attempt}: {}",
            reply.text()
        );
    }
    assert_eq!(
        std::fs::read_to_string(data.join("greeting.txt")).unwrap(),
        "hi from a file"
    );
    assert!(!data.join("new.txt").exists());
    // A function without the grant sees no files at all.
    let other = host.get("/fn/other/read?path=/data/greeting.txt").await;
    assert_eq!(other.status, StatusCode::FORBIDDEN);
    host.stop().await;
}

/// A loopback HTTP server that records the `Host` header of each request.
async fn recording_server() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let record = record.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let host = req
                            .headers()
                            .get("host")
                            .map(|h| h.to_str().unwrap_or("?").to_string())
                            .unwrap_or_default();
                        record.lock().unwrap().push(host);
                        async move {
                            Ok::<_, Infallible>(hyper::Response::new(Full::new(
                                Bytes::from_static(b"upstream says hi"),
                            )))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_requests_reach_only_allowed_hosts() {
    outbound_requests_reach_only_allowed_hosts_with("probe").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_requests_reach_only_allowed_hosts_p3() {
    outbound_requests_reach_only_allowed_hosts_with("probe-p3").await;
}

async fn outbound_requests_reach_only_allowed_hosts_with(fixture: &str) {
    let (allowed, allowed_seen) = recording_server().await;
    let (denied, denied_seen) = recording_server().await;
    let dir = tempfile::tempdir().unwrap();
    write_policy(
        dir.path(),
        "probe",
        &format!(
            "[outbound]\nallow = [\"http://127.0.0.1:{}\"]\n",
            allowed.port()
        ),
    );
    let host = host_with(dir.path(), &[("probe", fixture)]).await;

    let ok = host
        .get(&format!("/fn/probe/fetch?url=http://{allowed}/x"))
        .await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
    assert_eq!(
        ok.json(),
        serde_json::json!({"status": 200, "body": "upstream says hi"})
    );

    let refused = host
        .get(&format!("/fn/probe/fetch?url=http://{denied}/x"))
        .await;
    assert_eq!(
        refused.status,
        StatusCode::BAD_GATEWAY,
        "{}",
        refused.text()
    );
    assert!(
        refused.text().contains("HttpRequestDenied"),
        "{}",
        refused.text()
    );
    // Same host, other scheme: denied too.
    let https = host
        .get(&format!("/fn/probe/fetch?url=https://{allowed}/x"))
        .await;
    assert_eq!(https.status, StatusCode::BAD_GATEWAY);

    // A forged Host header cannot send the request elsewhere (CVE-2024-32980).
    let forged = host
        .get(&format!(
            "/fn/probe/fetch?url=http://{allowed}/y&host={denied}"
        ))
        .await;
    // The host refuses the header itself (wasi:http's `forbidden`), so the
    // request is never sent.
    assert_eq!(forged.status, StatusCode::BAD_REQUEST, "{}", forged.text());
    assert!(forged.text().contains("Forbidden"), "{}", forged.text());
    assert_eq!(*allowed_seen.lock().unwrap(), vec![allowed.to_string()]);
    assert!(
        denied_seen.lock().unwrap().is_empty(),
        "the denied server was reached"
    );
    assert_eq!(host.metric("lichen_outbound_denied_total").await, 2.0);

    // Without a policy, nothing is allowed.
    host.deploy("closed", component(fixture)).await;
    let closed = host
        .get(&format!("/fn/closed/fetch?url=http://{allowed}/x"))
        .await;
    assert_eq!(closed.status, StatusCode::BAD_GATEWAY);
    host.stop().await;
}

/// Polls the admin API until `check` holds for the function's policy view.
async fn wait_for_policy(
    host: &TestHost,
    name: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) -> Duration {
    let started = Instant::now();
    loop {
        let view = host
            .admin(
                Method::GET,
                &format!("/v1/functions/{name}/policy"),
                Vec::new(),
            )
            .await
            .json();
        if check(&view) {
            return started.elapsed();
        }
        assert!(started.elapsed() < PATIENCE, "policy never matched: {view}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_reload_live_and_a_broken_edit_keeps_the_last_good_one() {
    let dir = tempfile::tempdir().unwrap();
    write_policy(dir.path(), "probe", "[limits]\ntimeout = \"1s\"\n");
    let host = host_with(dir.path(), &[("probe", "probe")]).await;
    let slow = "/fn/probe/sleep?ms=1500";
    assert_eq!(host.get(slow).await.status, StatusCode::GATEWAY_TIMEOUT);

    // Raised by editing the file: in force without a restart.
    write_policy(dir.path(), "probe", "[limits]\ntimeout = \"1m\"\n");
    wait_for_policy(&host, "probe", |v| {
        v["in_force"]["limits"]["timeout"] == "1m"
    })
    .await;
    assert_eq!(host.get(slow).await.status, StatusCode::OK);

    // A broken edit: logged, visible, and the last good policy stays.
    write_policy(
        dir.path(),
        "probe",
        "[limits]\ntimeout = \"five seconds\"\n",
    );
    wait_for_policy(&host, "probe", |v| v["error"].is_string()).await;
    let view = host
        .admin(Method::GET, "/v1/functions/probe", Vec::new())
        .await
        .json();
    assert_eq!(view["policy"]["in_force"]["limits"]["timeout"], "1m");
    let error = view["policy"]["error"].as_str().unwrap();
    assert!(
        error.contains("probe.toml") && error.contains("timeout"),
        "{error}"
    );
    assert_eq!(host.get(slow).await.status, StatusCode::OK);
    assert!(host.metric("lichen_policy_reload_errors_total").await >= 1.0);

    // Fixed again: the error clears.
    write_policy(dir.path(), "probe", "[limits]\ntimeout = \"1s\"\n");
    wait_for_policy(&host, "probe", |v| {
        v["error"].is_null() && v["in_force"]["limits"]["timeout"] == "1s"
    })
    .await;

    // Deleted: the defaults apply.
    std::fs::remove_file(dir.path().join("policies/probe.toml")).unwrap();
    wait_for_policy(&host, "probe", |v| {
        v["in_force"]["limits"]["timeout"] == "10s"
    })
    .await;
    assert_eq!(host.get(slow).await.status, StatusCode::OK);
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_invocations_keep_the_policy_they_started_with() {
    let dir = tempfile::tempdir().unwrap();
    write_policy(dir.path(), "probe", "[limits]\ntimeout = \"1m\"\n");
    let host = host_with(dir.path(), &[("probe", "probe")]).await;
    let url = format!("{}/fn/probe/sleep?ms={SLOW_MS}", host.url);
    let running = tokio::spawn(async move { send(Method::GET, &url, &[], Vec::new()).await });
    until_in_flight(&host.url, "probe", 1.0).await;
    write_policy(dir.path(), "probe", "[limits]\ntimeout = \"1s\"\n");
    wait_for_policy(&host, "probe", |v| {
        v["in_force"]["limits"]["timeout"] == "1s"
    })
    .await;
    assert!(!running.is_finished(), "the call ended before the edit");
    assert_eq!(running.await.unwrap().status, StatusCode::OK);
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_whose_policy_never_loaded_does_not_run() {
    let dir = tempfile::tempdir().unwrap();
    write_policy(dir.path(), "probe", "[limits]\nmemory = \"lots\"\n");
    let host = host_with(dir.path(), &[("probe", "probe")]).await;
    let reply = host.get("/fn/probe/").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.code(), "policy_invalid");
    assert!(reply.text().contains("probe.toml"), "{}", reply.text());
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_writes_policy_files() {
    let dir = tempfile::tempdir().unwrap();
    let host = host_with(dir.path(), &[("probe", "probe")]).await;
    let text = "[env]\nMODE = \"api\"\n";
    let put = host
        .admin(
            Method::PUT,
            "/v1/functions/probe/policy",
            text.as_bytes().to_vec(),
        )
        .await;
    assert_eq!(put.status, StatusCode::OK, "{}", put.text());
    let file = dir.path().join("policies/probe.toml");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), text);
    assert_eq!(host.get("/fn/probe/env?name=MODE").await.text(), "api");

    let bad = host
        .admin(
            Method::PUT,
            "/v1/functions/probe/policy",
            b"[limits]\nspeed = 1\n".to_vec(),
        )
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(bad.code(), "invalid_policy");
    assert!(bad.text().contains("speed"), "{}", bad.text());
    assert_eq!(std::fs::read_to_string(&file).unwrap(), text);
    assert_eq!(host.get("/fn/probe/env?name=MODE").await.text(), "api");

    let unauthorized = send(
        Method::PUT,
        &format!("{}/v1/functions/probe/policy", host.url),
        &[],
        b"".to_vec(),
    )
    .await;
    assert_eq!(unauthorized.status, StatusCode::UNAUTHORIZED);
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_function_needs_a_token() {
    a_private_function_needs_a_token_with("echo").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_function_needs_a_token_p3() {
    a_private_function_needs_a_token_with("echo-p3").await;
}

async fn a_private_function_needs_a_token_with(fixture: &str) {
    let dir = tempfile::tempdir().unwrap();
    write_policy(
        dir.path(),
        "secret",
        "[access]\npublic = false\ntokens = [\"fn-token\"]\n",
    );
    let host = host_with(dir.path(), &[("secret", fixture)]).await;
    let url = format!("{}/fn/secret", host.url);
    let none = send(Method::GET, &url, &[], Vec::new()).await;
    assert_eq!(none.status, StatusCode::UNAUTHORIZED);
    let wrong = send(
        Method::GET,
        &url,
        &[("authorization", "Bearer nope")],
        Vec::new(),
    )
    .await;
    assert_eq!(wrong.status, StatusCode::FORBIDDEN);
    let with_fn_token = send(
        Method::GET,
        &url,
        &[("authorization", "Bearer fn-token")],
        Vec::new(),
    )
    .await;
    assert_eq!(with_fn_token.status, StatusCode::OK);
    // The token is for the host; the guest never sees it.
    let headers = with_fn_token.json()["headers"].to_string();
    assert!(!headers.contains("fn-token"), "{headers}");
    let with_admin = send(
        Method::GET,
        &url,
        &[("authorization", "Bearer test-token")],
        Vec::new(),
    )
    .await;
    assert_eq!(with_admin.status, StatusCode::OK);
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_heads_get_431() {
    let dir = tempfile::tempdir().unwrap();
    let host = host_with(dir.path(), &[("hello", "hello")]).await;
    let url = format!("{}/fn/hello", host.url);
    let names: Vec<String> = (0..150).map(|i| format!("x-h{i}")).collect();
    let many: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "v")).collect();
    assert_eq!(
        send(Method::GET, &url, &many, Vec::new()).await.status,
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
    );
    let huge = "v".repeat(80 * 1024);
    let reply = raw_request(
        &host,
        &format!("GET /fn/hello HTTP/1.1\r\nhost: x\r\nx-big: {huge}\r\n\r\n"),
    )
    .await;
    assert!(
        reply.starts_with("HTTP/1.1 431"),
        "{}",
        &reply[..reply.len().min(200)]
    );
    assert_eq!(host.get("/fn/hello").await.status, StatusCode::OK);
    host.stop().await;
}

/// How long a test waits for the host to close a connection it must cut
/// off: far above the sub-second limits the tests set, and below hyper's
/// own 30 s header timeout, so only the limit under test can close it.
const CUT_OFF_WITHIN: Duration = Duration::from_secs(15);

/// Sends raw bytes and reads until the server closes or [`CUT_OFF_WITHIN`]
/// passes.
async fn raw_request(host: &TestHost, request: &str) -> String {
    let addr = host.url.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = stream.write_all(request.as_bytes()).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(CUT_OFF_WITHIN, stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_and_connections_are_capped() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.header_read_timeout = Duration::from_millis(500);
    config.max_connections = 2;
    let host = TestHost::start(config).await;
    let addr = host.url.trim_start_matches("http://").to_string();

    // A slowloris client sends half a head and stalls: it is disconnected.
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(CUT_OFF_WITHIN, slow.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the stalled connection was not closed");

    // Two idle connections take both slots; a third is refused with 503
    // (the host accepts connections in the order they were made).
    let _a = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let _b = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let reply = raw_request(&host, "GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert!(reply.starts_with("HTTP/1.1 503"), "{reply}");
    assert!(
        reply.to_ascii_lowercase().contains("retry-after: 1"),
        "{reply}"
    );
    drop((_a, _b));
    eventually("the closed connections free their slots", || async {
        let url = format!("{}/healthz", host.url);
        let ok: Option<Reply> = common::try_send(Method::GET, &url, Vec::new()).await;
        ok.is_some_and(|ok| ok.status == StatusCode::OK)
    })
    .await;
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_caps_invocations_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.max_in_flight = 1;
    let host = TestHost::start(config).await;
    for name in ["a", "b"] {
        host.deploy(name, component("probe")).await;
    }
    let url = format!("{}/fn/a/sleep?ms={SLOW_MS}", host.url);
    let first = tokio::spawn(async move { send(Method::GET, &url, &[], Vec::new()).await });
    until_in_flight(&host.url, "a", 1.0).await;
    let other = host.get("/fn/b/").await;
    assert_eq!(other.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(other.headers["retry-after"], "1");
    assert_eq!(first.await.unwrap().status, StatusCode::OK);
    host.stop().await;
}

/// `tests/ui/invalid/*.toml`, each beside the message it must produce
/// (`*.stderr`). `BLESS=1` rewrites the expected messages.
#[test]
fn invalid_policy_files_give_the_expected_messages() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ui/invalid");
    let mut checked = 0;
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    for path in entries {
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let file = path.file_name().unwrap().to_str().unwrap();
        let error = lichen::policy::Policy::parse(&text, file, &dir)
            .expect_err(&format!("{file} should be invalid"));
        let expected_path = path.with_extension("stderr");
        // Resolved paths differ between checkouts.
        let actual = format!("{error}\n").replace(dir.to_str().unwrap(), "$DIR");
        if std::env::var_os("BLESS").is_some() {
            std::fs::write(&expected_path, &actual).unwrap();
        }
        let expected = std::fs::read_to_string(&expected_path).unwrap_or_else(|_| {
            panic!("{} is missing (run with BLESS=1)", expected_path.display())
        });
        assert_eq!(actual, expected, "{file}");
        checked += 1;
    }
    assert!(checked >= 8, "only {checked} golden files");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_request_body_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.body_idle_timeout = Duration::from_millis(500);
    let host = TestHost::start(config).await;
    host.deploy("echo", component("echo")).await;

    // An upload that stops halfway: 408, not a connection held forever.
    let upload = raw_request(
        &host,
        "PUT /v1/functions/slow HTTP/1.1\r\nhost: x\r\nauthorization: Bearer test-token\r\ncontent-length: 100\r\n\r\n0123456789",
    )
    .await;
    assert!(upload.starts_with("HTTP/1.1 408"), "{upload}");

    // An invocation whose body stalls: the guest's read fails and it answers.
    let invoke = raw_request(
        &host,
        "POST /fn/echo HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n0123456789",
    )
    .await;
    assert!(invoke.starts_with("HTTP/1.1 400"), "{invoke}");
    assert!(invoke.contains("reading the request body"), "{invoke}");
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_in_flight_than_instance_slots_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.max_in_flight = lichen::engine::POOL_INSTANCES + 1;
    let error = lichen::server::Server::bind(config).await.err().unwrap();
    assert!(error.to_string().contains("instance slots"), "{error}");
}

/// Questions the API fuzzing raised (tests/fuzz_api.rs), answered here:
/// a policy belongs to a name, deployed or not. Put in place before the
/// first deploy, it holds from the first request (a private function is
/// never public, not even for a moment); it outlives a delete of the
/// function; an empty body is the empty policy, the defaults; one over the
/// size cap is 413 and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_belongs_to_a_name_before_and_after_its_function() {
    let dir = tempfile::tempdir().unwrap();
    let host = host_with(dir.path(), &[]).await;
    let path = "/v1/functions/later/policy";
    let private = "[access]\npublic = false\ntokens = [\"caller-token\"]\n";
    let put = host
        .admin(Method::PUT, path, private.as_bytes().to_vec())
        .await;
    assert_eq!(put.status, StatusCode::OK, "{}", put.text());
    assert_eq!(put.json()["in_force"]["access"]["public"], false);

    let deployed = host.deploy("later", component("hello")).await;
    assert_eq!(deployed.status, StatusCode::CREATED, "{}", deployed.text());
    host.get("/fn/later")
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
    let url = format!("{}/fn/later", host.url);
    let allowed = send(
        Method::GET,
        &url,
        &[("authorization", "Bearer caller-token")],
        Vec::new(),
    )
    .await;
    assert_eq!(allowed.status, StatusCode::OK, "{}", allowed.text());

    let deleted = host
        .admin(Method::DELETE, "/v1/functions/later", Vec::new())
        .await;
    assert_eq!(deleted.status, StatusCode::OK);
    let kept = host.admin(Method::GET, path, Vec::new()).await;
    assert_eq!(kept.status, StatusCode::OK);
    assert_eq!(kept.json()["in_force"]["access"]["public"], false);
    let file = dir.path().join("policies/later.toml");
    // As written, its token kept as the token's hash.
    let hashed = lichen_core::policy::hash_access_tokens(private).unwrap();
    assert_eq!(std::fs::read_to_string(&file).unwrap(), hashed);

    let empty = host.admin(Method::PUT, path, Vec::new()).await;
    assert_eq!(empty.status, StatusCode::OK, "{}", empty.text());
    assert_eq!(empty.json()["in_force"]["access"]["public"], true);
    assert_eq!(empty.json()["in_force"]["limits"]["timeout"], "10s");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "");

    let huge = format!("# {}\n", "x".repeat(64 << 10));
    let refused = host.admin(Method::PUT, path, huge.into_bytes()).await;
    refused.assert_error(StatusCode::PAYLOAD_TOO_LARGE, "too_large");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "");
    host.stop().await;
}

/// A policy file rewritten in place is empty between its truncation and its
/// first write, and an empty policy is valid (the defaults, public): the
/// host reads a file written in place only once its writer closes it, so a
/// private function stays private throughout. (Found when a loaded machine
/// stretched that moment in the reload test.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_rewritten_in_place_is_read_once_written() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    write_policy(dir.path(), "hello", "[access]\npublic = false\n");
    let host = host_with(dir.path(), &[("hello", "hello")]).await;
    host.get("/fn/hello")
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "unauthorized");

    let path = dir.path().join("policies/hello.toml");
    let mut file = std::fs::File::create(&path).unwrap(); // truncated, still open
    tokio::time::sleep(Duration::from_millis(700)).await;
    host.get("/fn/hello")
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
    file.write_all(b"[access]\npublic = false\ntokens = [\"t2\"]\n")
        .unwrap();
    drop(file);
    // Read as written, and kept as the token's hash.
    let t2 = format!("sha256:{}", lichen_core::policy::access_token_hash("t2"));
    wait_for_policy(&host, "hello", |v| {
        v["in_force"]["access"]["tokens"] == serde_json::json!([t2])
    })
    .await;
    let url = format!("{}/fn/hello", host.url);
    let reply = send(
        Method::GET,
        &url,
        &[("authorization", "Bearer t2")],
        Vec::new(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    host.stop().await;
}
