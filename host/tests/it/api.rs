//! Deploy and invoke through a real host on 127.0.0.1:0 with the components
//! built from functions/.

#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

use crate::common;

use std::time::Duration;

use common::{FUNCTIONS, TestHost, component, distinct, send, test_config, write_policy};
use http::{Method, StatusCode};

async fn host() -> (TestHost, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let host = TestHost::start(test_config(dir.path())).await;
    (host, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_example_deploys_and_answers() {
    let (host, _dir) = host().await;
    for name in ["hello", "echo", "square", "fib", "hash"] {
        let reply = host.deploy(name, component(name)).await;
        assert_eq!(
            reply.status,
            StatusCode::CREATED,
            "{name}: {}",
            reply.text()
        );
        let body = reply.json();
        assert_eq!(body["name"], name);
        assert!(body["version"].as_u64().is_some_and(|v| v > 0), "{body}");
        assert_eq!(body["size"], component(name).len());
        assert_eq!(body["sha256"].as_str().unwrap().len(), 64);
    }

    let hello = host.get("/fn/hello").await;
    assert_eq!(hello.status, StatusCode::OK);
    assert_eq!(hello.text(), "Hello from Lichen!\n");
    assert_eq!(hello.headers["content-type"], "text/plain; charset=utf-8");
    assert!(hello.headers.contains_key("x-lichen-request-id"));

    let square = send(
        Method::POST,
        &format!("{}/fn/square", host.url),
        &[],
        b"12".to_vec(),
    )
    .await;
    assert_eq!(square.status, StatusCode::OK);
    assert_eq!(square.json(), serde_json::json!(144));
    let squares = send(
        Method::POST,
        &format!("{}/fn/square", host.url),
        &[],
        b"[1, -3, 2.5]".to_vec(),
    )
    .await;
    assert_eq!(squares.json(), serde_json::json!([1, 9, 6.25]));
    send(
        Method::POST,
        &format!("{}/fn/square", host.url),
        &[],
        b"\"x\"".to_vec(),
    )
    .await
    .assert_error_says(StatusCode::BAD_REQUEST, "expected a number");

    let fib = host.get("/fn/fib?n=20").await;
    assert_eq!(fib.json(), serde_json::json!({"n": 20, "fib": 6765}));

    // FIPS 180-2's "abc" vector, then a body of many blocks against the
    // host's own SHA-256 implementation.
    let hash_url = format!("{}/fn/hash", host.url);
    let hash = |body: Vec<u8>| send(Method::POST, &hash_url, &[], body);
    assert_eq!(
        hash(b"abc".to_vec()).await.text(),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\n"
    );
    let long: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(
        hash(long.clone()).await.text().trim_end(),
        lichen::store::sha256_hex(&long)
    );
    host.get("/fn/hash?mib=lots")
        .await
        .assert_error_says(StatusCode::BAD_REQUEST, "mib must be");

    let listed = host
        .admin(Method::GET, "/v1/functions", Vec::new())
        .await
        .json();
    let names: Vec<&str> = listed["functions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["echo", "fib", "hash", "hello", "square"]);
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_round_trips_the_request() {
    let (host, _dir) = host().await;
    assert_eq!(
        host.deploy("echo", component("echo")).await.status,
        StatusCode::CREATED
    );

    let reply = send(
        Method::PATCH,
        &format!("{}/fn/echo/a/b?x=1&y=two", host.url),
        &[("x-custom", "value one"), ("content-type", "text/plain")],
        b"body text".to_vec(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let echo = reply.json();
    assert_eq!(echo["method"], "PATCH");
    assert_eq!(echo["uri"], "/a/b?x=1&y=two");
    assert_eq!(echo["path"], "/a/b");
    assert_eq!(echo["query"], "x=1&y=two");
    assert_eq!(echo["body"], "body text");
    let headers = echo["headers"].as_array().unwrap();
    assert!(
        headers.contains(&serde_json::json!(["x-custom", "value one"])),
        "{headers:?}"
    );

    // The mount point itself is the guest's root.
    let root = host.get("/fn/echo").await.json();
    assert_eq!(root["uri"], "/");
    let root_query = host.get("/fn/echo?q=1").await.json();
    assert_eq!(root_query["uri"], "/?q=1");

    // Empty and 1 MiB bodies.
    let empty = send(
        Method::POST,
        &format!("{}/fn/echo", host.url),
        &[],
        Vec::new(),
    )
    .await
    .json();
    assert_eq!(empty["body_len"], 0);
    let big: Vec<u8> = (0..1 << 20).map(|i| b'a' + (i % 26) as u8).collect();
    let reply = send(
        Method::PUT,
        &format!("{}/fn/echo/big", host.url),
        &[],
        big.clone(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let echoed = reply.json();
    assert_eq!(echoed["body_len"], 1 << 20);
    assert_eq!(echoed["body"].as_str().unwrap().as_bytes(), &big[..]);
    host.stop().await;
}

/// An invocation takes any method, as `wasmtime serve` does: the function
/// decides what it means (the API fuzzing expected a 405 for QUERY; the
/// host passes it on by design). Other routes answer 405 with `Allow`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_method_reaches_the_function() {
    let (host, _dir) = host().await;
    assert_eq!(
        host.deploy("echo", component("echo")).await.status,
        StatusCode::CREATED
    );
    for method in ["QUERY", "PROPFIND", "TRACE", "OPTIONS"] {
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let reply = send(
            method.clone(),
            &format!("{}/fn/echo/x", host.url),
            &[],
            Vec::new(),
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK, "{method}: {}", reply.text());
        assert_eq!(reply.json()["method"], method.as_str());
    }
    let query = Method::from_bytes(b"QUERY").unwrap();
    let refused = send(query, &format!("{}/healthz", host.url), &[], Vec::new()).await;
    refused.assert_error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    assert_eq!(refused.headers["allow"], "GET");
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_built_without_the_sdk_runs_unmodified() {
    let (host, _dir) = host().await;
    assert_eq!(
        host.deploy("raw", component("raw-wasi")).await.status,
        StatusCode::CREATED
    );
    let reply = host.get("/fn/raw/some/path?k=v").await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    assert_eq!(reply.headers["x-raw"], "yes");
    assert_eq!(reply.text(), "raw wasi component saw /some/path?k=v");
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_uploads_are_refused_and_nothing_is_stored() {
    let (host, dir) = host().await;
    let garbage = host.deploy("junk", b"definitely not wasm".to_vec()).await;
    assert_eq!(garbage.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(garbage.code(), "not_wasm");

    let core = host
        .deploy(
            "core",
            wat::parse_str("(module (func (export \"f\")))").unwrap(),
        )
        .await;
    core.assert_error(StatusCode::UNPROCESSABLE_ENTITY, "core_module");
    core.assert_error_says(StatusCode::UNPROCESSABLE_ENTITY, "wasm32-wasip2");

    let empty_component = host
        .deploy("empty", wat::parse_str("(component)").unwrap())
        .await;
    assert_eq!(empty_component.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(empty_component.code(), "not_http_handler");

    let mut truncated = component("hello");
    truncated.truncate(truncated.len() / 2);
    let truncated = host.deploy("truncated", truncated).await;
    assert_eq!(truncated.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(truncated.code(), "invalid_component");

    let listed = host
        .admin(Method::GET, "/v1/functions", Vec::new())
        .await
        .json();
    assert_eq!(listed["functions"], serde_json::json!([]));
    for sub in ["modules", "functions", "tmp"] {
        let entries = std::fs::read_dir(dir.path().join(sub)).unwrap().count();
        assert_eq!(entries, 0, "{sub} should be empty");
    }
    assert_eq!(host.get("/fn/junk").await.status, StatusCode::NOT_FOUND);
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_upload_keeps_the_previous_version() {
    let (host, _dir) = host().await;
    let first = host.deploy("hello", component("hello")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let refused = host.deploy("hello", b"\0asm\x01\0\0\0".to_vec()).await;
    assert_eq!(refused.status, StatusCode::UNPROCESSABLE_ENTITY);
    let still = host.get("/fn/hello").await;
    assert_eq!(still.text(), "Hello from Lichen!\n");
    let described = host
        .admin(Method::GET, "/v1/functions/hello", Vec::new())
        .await
        .json();
    assert_eq!(described["version"], first.json()["version"]);
    assert_eq!(described["versions"].as_array().unwrap().len(), 1);
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_are_validated() {
    let (host, _dir) = host().await;
    for bad in ["Hello", "-x", "a_b", "a.b", &"x".repeat(64), "%2e%2e"] {
        let reply = host.deploy(bad, component("hello")).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{bad}: {}",
            reply.text()
        );
        assert_eq!(reply.code(), "invalid_name");
    }
    let max = "a".repeat(63);
    assert_eq!(
        host.deploy(&max, component("hello")).await.status,
        StatusCode::CREATED
    );
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_over_the_cap_get_413_even_when_streamed() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.max_upload = 64 * 1024;
    let host = TestHost::start(config).await;

    // Declared too large.
    let oversized = vec![0u8; 64 * 1024 + 1];
    let reply = host.deploy("big", oversized).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(reply.code(), "too_large");

    // Streamed without a length: cut off while streaming.
    let (sender, body) = {
        let (tx, rx) =
            tokio::sync::mpsc::channel::<Result<http_body::Frame<bytes::Bytes>, std::io::Error>>(4);
        (tx, http_body_util::StreamBody::new(tokio_stream_from(rx)))
    };
    let request = http::Request::builder()
        .method(Method::PUT)
        .uri(format!("{}/v1/functions/big", host.url))
        .header("authorization", format!("Bearer {}", host.token))
        .body(body)
        .unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let feeder = tokio::spawn(async move {
        // 1 MiB in 16 KiB chunks; the host answers long before the end.
        for _ in 0..64 {
            let chunk = bytes::Bytes::from(vec![0u8; 16 * 1024]);
            if sender
                .send(Ok(http_body::Frame::data(chunk)))
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let response = tokio::time::timeout(Duration::from_secs(30), client.request(request))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    feeder.abort();

    let listed = host
        .admin(Method::GET, "/v1/functions", Vec::new())
        .await
        .json();
    assert_eq!(listed["functions"], serde_json::json!([]));
    host.stop().await;
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_routes_need_the_token() {
    let (host, _dir) = host().await;
    let url = format!("{}/v1/functions", host.url);
    let missing = send(Method::GET, &url, &[], Vec::new()).await;
    assert_eq!(missing.status, StatusCode::UNAUTHORIZED);
    assert_eq!(missing.code(), "unauthorized");
    let wrong = send(
        Method::GET,
        &url,
        &[("authorization", "Bearer nope")],
        Vec::new(),
    )
    .await;
    assert_eq!(wrong.status, StatusCode::FORBIDDEN);
    let not_bearer = send(
        Method::GET,
        &url,
        &[("authorization", "test-token")],
        Vec::new(),
    )
    .await;
    assert_eq!(not_bearer.status, StatusCode::FORBIDDEN);
    let put = send(
        Method::PUT,
        &format!("{url}/hello"),
        &[],
        component("hello"),
    )
    .await;
    assert_eq!(put.status, StatusCode::UNAUTHORIZED);
    let right = host.admin(Method::GET, "/v1/functions", Vec::new()).await;
    assert_eq!(right.status, StatusCode::OK);
    // Nothing was deployed by the refused PUT.
    assert_eq!(host.get("/fn/hello").await.status, StatusCode::NOT_FOUND);
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_functions_and_routes_are_404() {
    let (host, _dir) = host().await;
    let reply = host.get("/fn/nobody/here").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.code(), "not_found");
    assert_eq!(host.get("/nowhere").await.status, StatusCode::NOT_FOUND);
    let described = host
        .admin(Method::GET, "/v1/functions/nobody", Vec::new())
        .await;
    assert_eq!(described.status, StatusCode::NOT_FOUND);
    assert_eq!(host.get("/healthz").await.status, StatusCode::OK);
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trap_is_a_500_and_the_host_stays_up() {
    let (host, _dir) = host().await;
    assert_eq!(
        host.deploy("trap", component("trap")).await.status,
        StatusCode::CREATED
    );
    for path in ["/fn/trap/panic", "/fn/trap/unreachable"] {
        let reply = host.get(path).await;
        assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR, "{path}");
        assert_eq!(reply.code(), "trap");
        assert_eq!(reply.headers["content-type"], "application/json");
        let next = host.get("/fn/trap/fine").await;
        assert_eq!(next.status, StatusCode::OK);
        assert_eq!(next.text(), "ok\n");
    }
    // An error the handler returns is the guest's own answer, not a trap.
    let handled = host.get("/fn/trap/error").await;
    assert_eq!(handled.status.as_u16(), 418);
    assert_eq!(handled.json()["error"], "an error the handler returned");
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_past_its_deadline_gets_504() {
    let dir = tempfile::tempdir().unwrap();
    write_policy(dir.path(), "fib", "[limits]\ntimeout = \"1s\"\n");
    let host = TestHost::start(test_config(dir.path())).await;
    assert_eq!(
        host.deploy("fib", component("fib")).await.status,
        StatusCode::CREATED
    );
    let started = std::time::Instant::now();
    let reply = host.get("/fn/fib?n=60").await;
    assert_eq!(
        reply.status,
        StatusCode::GATEWAY_TIMEOUT,
        "{}",
        reply.text()
    );
    assert_eq!(reply.code(), "timeout");
    // Stopped by the 1 s deadline, not by fib(60)'s own end (hours away).
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(host.get("/fn/fib?n=10").await.json()["fib"], 55);
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_bytes_give_the_same_hash_and_version() {
    let (host, _dir) = host().await;
    let first = host.deploy("hello", component("hello")).await;
    let again = host.deploy("hello", component("hello")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(first.json()["sha256"], again.json()["sha256"]);
    assert_eq!(again.json()["version"], first.json()["version"]);
    let other = host.deploy("greeting", component("hello")).await;
    assert_eq!(other.json()["sha256"], first.json()["sha256"]);
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_then_invoke_is_404() {
    let (host, dir) = host().await;
    assert_eq!(
        host.deploy("hello", component("hello")).await.status,
        StatusCode::CREATED
    );
    let deleted = host
        .admin(Method::DELETE, "/v1/functions/hello", Vec::new())
        .await;
    assert_eq!(deleted.status, StatusCode::OK);
    assert_eq!(host.get("/fn/hello").await.status, StatusCode::NOT_FOUND);
    let again = host
        .admin(Method::DELETE, "/v1/functions/hello", Vec::new())
        .await;
    assert_eq!(again.status, StatusCode::NOT_FOUND);
    // Its module is no longer kept.
    assert_eq!(
        std::fs::read_dir(dir.path().join("modules"))
            .unwrap()
            .count(),
        0
    );
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_functions_without_recompiling() {
    let dir = tempfile::tempdir().unwrap();
    let host = TestHost::start(test_config(dir.path())).await;
    for name in ["hello", "square"] {
        assert_eq!(
            host.deploy(name, component(name)).await.status,
            StatusCode::CREATED
        );
    }
    assert_eq!(
        host.metric("lichen_compile_duration_seconds_count").await,
        2.0
    );
    host.stop().await;

    let restarted = TestHost::start(test_config(dir.path())).await;
    assert_eq!(
        restarted.get("/fn/hello").await.text(),
        "Hello from Lichen!\n"
    );
    let squared = send(
        Method::POST,
        &format!("{}/fn/square", restarted.url),
        &[],
        b"3".to_vec(),
    )
    .await;
    assert_eq!(squared.json(), serde_json::json!(9));
    assert_eq!(
        restarted
            .metric("lichen_compile_duration_seconds_count")
            .await,
        0.0
    );
    assert_eq!(restarted.metric("lichen_code_cache_loads_total").await, 2.0);
    restarted.stop().await;

    // Damaged cached code is recompiled, not trusted.
    for entry in common::files_under(&dir.path().join("compiled")) {
        std::fs::write(entry, b"garbage").unwrap();
    }
    let third = TestHost::start(test_config(dir.path())).await;
    // Code is loaded on first use: nothing compiled before a call.
    assert_eq!(
        third.metric("lichen_compile_duration_seconds_count").await,
        0.0
    );
    assert_eq!(third.get("/fn/hello").await.text(), "Hello from Lichen!\n");
    assert_eq!(
        third.metric("lichen_compile_duration_seconds_count").await,
        1.0
    );
    third.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redeploy_switches_versions_without_failing_requests() {
    redeploy_under_load("hello", "echo").await;
}

/// From one `wasi:http` generation to the other and back, under load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redeploy_switches_abi_without_failing_requests() {
    redeploy_under_load("hello", "echo-p3").await;
    redeploy_under_load("hello-p3", "echo").await;
}

/// Deploys `v1` (a hello) as `svc`, then `v2` (an echo) while four clients
/// call it: none fails, and each sees v1 then v2, never going back.
async fn redeploy_under_load(v1: &str, v2: &str) {
    let (host, _dir) = host().await;
    assert_eq!(
        host.deploy("svc", component(v1)).await.status,
        StatusCode::CREATED
    );
    let url = format!("{}/fn/svc", host.url);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let url = url.clone();
        let stop = stop.clone();
        clients.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let reply = send(Method::GET, &url, &[], Vec::new()).await;
                assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
                seen.push(reply.text().starts_with("Hello"));
            }
            seen
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let v2 = host.deploy("svc", component(v2)).await;
    assert_eq!(v2.status, StatusCode::CREATED);
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for client in clients {
        let seen = client.await.unwrap();
        // Every client saw v1 then v2, never going back.
        let switched = seen.iter().position(|hello| !hello).unwrap_or(seen.len());
        assert!(seen[switched..].iter().all(|hello| !hello), "{seen:?}");
    }
    assert_eq!(host.get("/fn/svc").await.json()["uri"], "/");
    host.stop().await;
}

#[test]
fn every_function_crate_is_a_known_fixture() {
    let manifest = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../functions/Cargo.toml"
    ))
    .unwrap();
    // `members = [...]`, on one line or several, without its comments.
    let start = manifest.find("\nmembers").unwrap();
    let end = start + manifest[start..].find(']').unwrap();
    let members_list: String = manifest[start..end]
        .lines()
        .map(|line| line.split('#').next().unwrap_or_default())
        .collect();
    let mut members: Vec<String> = members_list
        .split('"')
        .skip(1)
        .step_by(2)
        .map(|path| path.rsplit('/').next().unwrap().to_string())
        .collect();
    members.sort();
    let mut known: Vec<String> = FUNCTIONS.iter().map(|s| s.to_string()).collect();
    known.sort();
    assert_eq!(members, known);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn code_of_the_least_recently_called_functions_is_unloaded() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.max_loaded_functions = 2;
    let host = TestHost::start(config).await;
    for name in ["a", "b", "c"] {
        assert_eq!(
            host.deploy(name, component("hello")).await.status,
            StatusCode::CREATED
        );
    }
    // Deploying loads; the third deploy unloaded the least recent, a.
    assert_eq!(loaded(&host, "a").await, false);
    assert_eq!(loaded(&host, "c").await, true);
    // Calling a loads it again (from the cache) and unloads b.
    assert_eq!(host.get("/fn/a").await.text(), "Hello from Lichen!\n");
    assert_eq!(loaded(&host, "a").await, true);
    assert_eq!(loaded(&host, "b").await, false);
    assert_eq!(host.get("/fn/b").await.status, StatusCode::OK);
    // One compile (the three share their bytes); b and c's deploys and the
    // two reloads came from the cache.
    assert_eq!(
        host.metric("lichen_compile_duration_seconds_count").await,
        1.0
    );
    assert_eq!(host.metric("lichen_code_cache_loads_total").await, 4.0);
    host.stop().await;
}

async fn loaded(host: &TestHost, name: &str) -> serde_json::Value {
    let path = format!("/v1/functions/{name}");
    host.admin(Method::GET, &path, Vec::new()).await.json()["loaded"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_last_ten_versions_are_kept_on_disk() {
    let (host, dir) = host().await;
    let mut ids = Vec::new();
    for i in 0..12 {
        let reply = host
            .deploy("hello", distinct(&component("hello"), &format!("v{i}")))
            .await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
        ids.push(reply.json()["version"].clone());
    }
    // Every deploy has an id of its own.
    let distinct_ids: std::collections::BTreeSet<String> =
        ids.iter().map(|id| id.to_string()).collect();
    assert_eq!(distinct_ids.len(), 12);
    let described = host
        .admin(Method::GET, "/v1/functions/hello", Vec::new())
        .await
        .json();
    let kept: Vec<serde_json::Value> = described["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].clone())
        .collect();
    // The last ten, oldest first, each superseded by the next.
    assert_eq!(kept, ids[2..]);
    for pair in described["versions"].as_array().unwrap().windows(2) {
        assert_eq!(pair[0]["superseded_by"], pair[1]["version"]);
    }
    assert_eq!(
        std::fs::read_dir(dir.path().join("modules"))
            .unwrap()
            .count(),
        10
    );
    assert_eq!(host.get("/fn/hello").await.text(), "Hello from Lichen!\n");
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_map_on_one_host_answers_in_order_and_refuses_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    write_policy(
        dir.path(),
        "secret-square",
        "[access]\npublic = false\ntokens = [\"let-me-in\"]\n",
    );
    let host = common::host_with(
        dir.path(),
        &[("square", "square"), ("secret-square", "square")],
    )
    .await;
    let map = |name: &str| format!("{}/v1/functions/{name}/map", host.url);

    let inputs: Vec<i64> = (0..300).map(|i| i - 150).collect();
    let reply = send(
        Method::POST,
        &map("square"),
        &[],
        serde_json::to_vec(&inputs).unwrap(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let results = reply.json();
    let expected: Vec<serde_json::Value> = inputs
        .iter()
        .map(|i| serde_json::json!({ "status": 200, "body": i * i }))
        .collect();
    assert_eq!(results, serde_json::Value::Array(expected));
    let empty = send(Method::POST, &map("square"), &[], b"[]".to_vec()).await;
    assert_eq!(empty.json(), serde_json::json!([]));

    send(
        Method::POST,
        &map("square"),
        &[],
        b"{\"not\": \"an array\"}".to_vec(),
    )
    .await
    .assert_error(StatusCode::BAD_REQUEST, "invalid_map");
    send(Method::POST, &map("nothing-here"), &[], b"[1]".to_vec())
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    send(Method::POST, &map("secret-square"), &[], b"[1]".to_vec())
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
    let allowed = send(
        Method::POST,
        &map("secret-square"),
        &[("authorization", "Bearer let-me-in")],
        b"[4]".to_vec(),
    )
    .await;
    assert_eq!(
        allowed.json(),
        serde_json::json!([{ "status": 200, "body": 16 }])
    );
    host.stop().await;
}

/// `?path=` sends each item to that path of the function, which the guest
/// sees exactly as it would on a direct `POST /fn/{name}{path}`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_map_sends_its_items_to_the_path_it_names() {
    let dir = tempfile::tempdir().unwrap();
    let host = common::host_with(dir.path(), &[("echo", "echo")]).await;
    let map = |query: &str| format!("{}/v1/functions/echo/map{query}", host.url);
    for path in ["/", "/grad", "/a/b.c", "//twice", "/with%20space"] {
        let direct = send(
            Method::POST,
            &format!("{}/fn/echo{path}", host.url),
            &[],
            b"1".to_vec(),
        )
        .await;
        assert_eq!(direct.status, StatusCode::OK, "{path}: {}", direct.text());
        let mapped = send(
            Method::POST,
            &map(&format!("?path={path}")),
            &[],
            b"[1]".to_vec(),
        )
        .await;
        assert_eq!(mapped.status, StatusCode::OK, "{path}: {}", mapped.text());
        assert_eq!(
            mapped.json()[0]["body"]["path"],
            direct.json()["path"],
            "{path}"
        );
    }
    let default = send(Method::POST, &map(""), &[], b"[1]".to_vec()).await;
    assert_eq!(default.json()[0]["body"]["path"], "/");
    for query in ["?path=grad", "?path=", "?path=/a%3Fb?c"] {
        send(Method::POST, &map(query), &[], b"[1]".to_vec())
            .await
            .assert_error(StatusCode::BAD_REQUEST, "invalid_map");
    }
    let long = format!("?path=/{}", "a".repeat(1024));
    send(Method::POST, &map(&long), &[], b"[1]".to_vec())
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_map");
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_makes_an_earlier_version_active_again() {
    let (host, _dir) = host().await;
    let rollback = |body: &'static str| {
        host.admin(
            Method::POST,
            "/v1/functions/app/rollback",
            body.as_bytes().to_vec(),
        )
    };
    let v1 = host.deploy("app", component("hello")).await.json()["version"].clone();
    rollback("")
        .await
        .assert_error(StatusCode::CONFLICT, "no_previous_version");
    let v2 = host.deploy("app", component("echo")).await.json()["version"].clone();
    let says = |path: &'static str| {
        let url = format!("{}/fn/app{path}", host.url);
        async move { send(Method::POST, &url, &[], b"ping".to_vec()).await.text() }
    };
    assert!(says("/").await.contains("ping"), "echo answers");

    let back = rollback("").await;
    assert_eq!(back.status, StatusCode::OK, "{}", back.text());
    assert_eq!(back.json()["version"], v1);
    assert!(says("/").await.contains("Hello"), "hello answers again");
    let described = host
        .admin(Method::GET, "/v1/functions/app", Vec::new())
        .await;
    assert_eq!(described.json()["version"], v1);
    // Forward again by id; asking for the active one changes nothing.
    let to_v2 = format!(r#"{{"version": {v2}}}"#).into_bytes();
    let forward = host
        .admin(Method::POST, "/v1/functions/app/rollback", to_v2.clone())
        .await;
    assert_eq!(forward.json()["version"], v2);
    let again = host
        .admin(Method::POST, "/v1/functions/app/rollback", to_v2)
        .await;
    assert_eq!(again.status, StatusCode::OK);
    assert!(says("/").await.contains("ping"));
    // A rollback is a change of its own: the history stays as deployed.
    let described = host
        .admin(Method::GET, "/v1/functions/app", Vec::new())
        .await
        .json();
    let versions = described["versions"].as_array().unwrap();
    assert_eq!(versions.len(), 2);
    assert_eq!(versions[1]["active"], true);

    rollback(r#"{"version": 9}"#)
        .await
        .assert_error(StatusCode::NOT_FOUND, "no_such_version");
    rollback(r#"{"to": 1}"#)
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_rollback");
    host.admin(Method::POST, "/v1/functions/nope/rollback", Vec::new())
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_back_past_what_is_kept_is_refused() {
    let (host, _dir) = host().await;
    // Twelve versions: the first two are forgotten, their modules collected.
    let mut ids = Vec::new();
    for n in 1..=12 {
        let reply = host
            .deploy("app", distinct(&component("hello"), &n.to_string()))
            .await;
        ids.push(reply.json()["version"].as_u64().unwrap());
    }
    let rollback = |version: u64| {
        host.admin(
            Method::POST,
            "/v1/functions/app/rollback",
            format!(r#"{{"version": {version}}}"#).into_bytes(),
        )
    };
    let gone = rollback(ids[1]).await;
    gone.assert_error(StatusCode::NOT_FOUND, "no_such_version");
    assert!(gone.text().contains("keeps its last 10"), "{}", gone.text());
    assert_eq!(rollback(ids[2]).await.json()["version"], ids[2]);
    host.stop().await;
}
