//! WASIp3 components (`wasi:http/service@0.3`) beside WASIp2 ones, through
//! real HTTP against a real host: the p3 fixtures are the p2 examples'
//! own sources built with the SDK's `p3` feature.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::time::Duration;

use common::{host_with, send};
use http::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_p3_component_deploys_answers_and_says_its_abi() {
    let dir = tempfile::tempdir().unwrap();
    let host = host_with(dir.path(), &[("hello", "hello-p3"), ("old", "hello")]).await;
    let reply = host.get("/fn/hello").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.text(), "Hello from Lichen!\n");
    let deployed = host.deploy("again", common::component("hello-p3")).await;
    assert_eq!(deployed.status, StatusCode::CREATED, "{}", deployed.text());
    assert_eq!(deployed.json()["abi"], "p3");

    let described = host
        .admin(Method::GET, "/v1/functions/hello", Vec::new())
        .await
        .json();
    assert_eq!(described["abi"], "p3");
    assert_eq!(described["versions"][0]["abi"], "p3");
    let old = host
        .admin(Method::GET, "/v1/functions/old", Vec::new())
        .await
        .json();
    assert_eq!(old["abi"], "p2");
    let listed = host.admin(Method::GET, "/v1/functions", Vec::new()).await;
    let abis: Vec<serde_json::Value> = listed.json()["functions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["abi"].clone())
        .collect();
    assert_eq!(abis, ["p3", "p3", "p2"]);
    host.stop().await;
}

/// The benchmark's `hello-p3-raw` stands in for hello-p3 (bench/NOTES.md):
/// it must answer the same, with a request body it never reads too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_raw_hello_answers_as_the_sdks_hello_does() {
    let dir = tempfile::tempdir().unwrap();
    let host = host_with(dir.path(), &[("sdk", "hello-p3"), ("raw", "hello-p3-raw")]).await;
    for (method, body) in [(Method::GET, ""), (Method::POST, "unread")] {
        let url = |name: &str| format!("{}/fn/{name}/any?x=1", host.url);
        let sdk = send(method.clone(), &url("sdk"), &[], body.into()).await;
        let raw = send(method, &url("raw"), &[], body.into()).await;
        assert_eq!(sdk.status, StatusCode::OK, "{}", sdk.text());
        assert_eq!(raw.status, sdk.status, "{}", raw.text());
        assert_eq!(
            raw.headers.get("content-type"),
            sdk.headers.get("content-type")
        );
        assert_eq!(raw.text(), sdk.text());
        assert_eq!(raw.text(), "Hello from Lichen!\n");
    }
    host.stop().await;
}

/// The SDK fetches a request's body only when the handler asks for it, in
/// both generations: hello, which never does, answers a POST whose body is
/// still on its way; echo, which does, answers once the body has all come
/// (WASIp3 waits for it inside the async export with `block_on`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_reads_the_body_only_when_the_handler_asks() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::test_config(dir.path());
    // Far beyond the test's patience: no answer below comes from a timeout.
    config.body_idle_timeout = Duration::from_secs(3600);
    let host = common::TestHost::start(config).await;
    for (name, fixture) in [
        ("hello", "hello"),
        ("hello-p3", "hello-p3"),
        ("echo", "echo"),
        ("echo-p3", "echo-p3"),
    ] {
        let deployed = host.deploy(name, common::component(fixture)).await;
        assert_eq!(deployed.status, StatusCode::CREATED, "{}", deployed.text());
    }
    let addr = host.url.trim_start_matches("http://").to_string();
    let head =
        |name: &str| format!("POST /fn/{name} HTTP/1.1\r\nhost: x\r\ncontent-length: 20\r\n\r\n");

    for name in ["hello", "hello-p3"] {
        let mut stream = TcpStream::connect(&addr).await.unwrap();
        stream.write_all(head(name).as_bytes()).await.unwrap();
        stream.write_all(b"first half").await.unwrap();
        let answer = read_until(&mut stream, "Hello from Lichen!\n").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{name}: {answer}");
    }

    for name in ["echo", "echo-p3"] {
        let mut stream = TcpStream::connect(&addr).await.unwrap();
        stream.write_all(head(name).as_bytes()).await.unwrap();
        stream.write_all(b"first half").await.unwrap();
        // Nothing can come before the rest of the body, however long we wait.
        let mut early = [0u8; 1];
        let waited =
            tokio::time::timeout(Duration::from_millis(500), stream.read(&mut early)).await;
        assert!(waited.is_err(), "{name} answered before its body came");
        stream.write_all(b"second one").await.unwrap();
        let answer = read_until(&mut stream, "\"body_len\":20").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{name}: {answer}");
        assert!(answer.contains("first halfsecond one"), "{name}: {answer}");
    }
    host.stop().await;
}

/// Reads from `stream` until `wanted` has arrived, within the tests' patience.
async fn read_until(stream: &mut TcpStream, wanted: &str) -> String {
    let mut out = Vec::new();
    let read = tokio::time::timeout(common::PATIENCE, async {
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&out).contains(wanted) {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&out).into_owned();
    assert!(
        read.is_ok(),
        "no {wanted:?} within {:?}: {text}",
        common::PATIENCE
    );
    assert!(
        text.contains(wanted),
        "the connection closed before {wanted:?}: {text}"
    );
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_p3_component_sees_the_request_as_a_p2_one_does() {
    let dir = tempfile::tempdir().unwrap();
    let host = host_with(dir.path(), &[("echo", "echo-p3"), ("echo2", "echo")]).await;
    for name in ["echo", "echo2"] {
        let reply = send(
            Method::PATCH,
            &format!("{}/fn/{name}/a/b?x=1&y=two", host.url),
            &[("x-custom", "value one"), ("content-type", "text/plain")],
            b"body text".to_vec(),
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK, "{name}: {}", reply.text());
        let echo = reply.json();
        assert_eq!(echo["method"], "PATCH");
        assert_eq!(echo["uri"], "/a/b?x=1&y=two");
        assert_eq!(echo["query"], "x=1&y=two");
        assert_eq!(echo["body"], "body text");
        let headers = echo["headers"].as_array().unwrap();
        assert!(
            headers.contains(&serde_json::json!(["x-custom", "value one"])),
            "{name}: {headers:?}"
        );
    }
    // Empty and 1 MiB bodies, both ways.
    let empty = send(
        Method::POST,
        &format!("{}/fn/echo", host.url),
        &[],
        Vec::new(),
    )
    .await;
    assert_eq!(empty.json()["body_len"], 0);
    let big: Vec<u8> = (0..1 << 20).map(|i| b'a' + (i % 26) as u8).collect();
    let reply = send(
        Method::PUT,
        &format!("{}/fn/echo/big", host.url),
        &[],
        big.clone(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let echoed = reply.json();
    assert_eq!(echoed["body_len"], 1 << 20);
    assert_eq!(echoed["body"].as_str().unwrap().as_bytes(), &big[..]);
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_p3_trap_is_that_requests_500_and_the_host_stays_up() {
    let dir = tempfile::tempdir().unwrap();
    let host = host_with(dir.path(), &[("trap", "trap-p3")]).await;
    for path in ["/fn/trap/panic", "/fn/trap/unreachable"] {
        let reply = host.get(path).await;
        reply.assert_error(StatusCode::INTERNAL_SERVER_ERROR, "trap");
        let next = host.get("/fn/trap/").await;
        assert_eq!(next.status, StatusCode::OK, "{}", next.text());
        assert_eq!(next.text(), "ok\n");
    }
    let handled = host.get("/fn/trap/error").await;
    assert_eq!(handled.status.as_u16(), 418);
    host.stop().await;
}

/// Metrics, logs and the map API treat a p3 function as a p2 one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_p3_function_is_counted_logged_and_mapped() {
    let dir = tempfile::tempdir().unwrap();
    let host = host_with(dir.path(), &[("echo", "echo-p3"), ("trap", "trap-p3")]).await;
    for _ in 0..3 {
        assert_eq!(host.get("/fn/echo").await.status, StatusCode::OK);
    }
    assert_eq!(host.get("/fn/trap/log").await.text(), "logged\n");
    host.get("/fn/trap/panic")
        .await
        .assert_error(StatusCode::INTERNAL_SERVER_ERROR, "trap");
    let metrics = host.get("/metrics").await.text();
    let value = |series: &str| -> f64 {
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series} in\n{metrics}"))
    };
    assert_eq!(
        value("lichen_invocations_total{function=\"echo\",outcome=\"ok\"}"),
        3.0
    );
    assert_eq!(
        value("lichen_invocations_total{function=\"trap\",outcome=\"trap\"}"),
        1.0
    );
    assert_eq!(
        value("lichen_instantiate_duration_seconds_count{function=\"echo\"}"),
        3.0
    );
    assert!(value("lichen_memory_peak_bytes{function=\"echo\"}") > 0.0);

    let mapped = host
        .admin(
            Method::POST,
            "/v1/functions/echo/map",
            b"[1, \"two\", {\"three\": 3}]".to_vec(),
        )
        .await;
    assert_eq!(mapped.status, StatusCode::OK, "{}", mapped.text());
    let bodies: Vec<serde_json::Value> = mapped
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|item| {
            assert_eq!(item["status"], 200, "{item}");
            item["body"]["body"].clone()
        })
        .collect();
    assert_eq!(bodies, ["1", "\"two\"", "{\"three\":3}"]);
    host.stop().await;
}

/// A WASIp3 component from another toolchain runs unmodified: Python,
/// built by componentize-py against the WIT the host links.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_p3_component_runs_unmodified() {
    let dir = tempfile::tempdir().unwrap();
    let host = host_with(dir.path(), &[]).await;
    let deployed = host
        .deploy_large("py", common::python_component("echo"))
        .await;
    assert_eq!(deployed.status, StatusCode::CREATED, "{}", deployed.text());
    assert_eq!(deployed.json()["abi"], "p3");
    let reply = send(
        Method::POST,
        &format!("{}/fn/py/a/b?x=1", host.url),
        &[("x-custom", "value")],
        b"hello".to_vec(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let echo = reply.json();
    assert_eq!(echo["language"], "python");
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["uri"], "/a/b?x=1");
    assert_eq!(echo["body_len"], 5);
    assert!(
        echo["headers"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!(["x-custom", "value"])),
        "{echo}"
    );
    host.stop().await;
}

/// A p3 component answers the same under Lichen as under `wasmtime serve`
/// 49: method, path, query, headers and body as the guest saw them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_p3_component_answers_as_under_wasmtime_serve() {
    let dir = tempfile::tempdir().unwrap();
    let host = host_with(dir.path(), &[("echo", "echo-p3")]).await;
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../functions/target/wasm32-wasip2/release/echo_p3.wasm");
    let wasmtime = common::WasmtimeServe::start(&path, &[]);
    let big: Vec<u8> = (0..1 << 20).map(|i| b'a' + (i % 26) as u8).collect();
    let cases: Vec<(Method, &str, Vec<u8>)> = vec![
        (Method::GET, "/", Vec::new()),
        (Method::PATCH, "/a/b?x=1&y=two", b"body text".to_vec()),
        (Method::PUT, "/big", big),
        (Method::DELETE, "/a%20b/", Vec::new()),
    ];
    for (method, target, body) in cases {
        let headers = [("x-custom", "value one"), ("content-type", "text/plain")];
        let ours = send(
            method.clone(),
            &format!("{}/fn/echo{target}", host.url),
            &headers,
            body.clone(),
        )
        .await;
        let theirs = send(
            method.clone(),
            &format!("{}{target}", wasmtime.url),
            &headers,
            body,
        )
        .await;
        assert_eq!(ours.status, theirs.status, "{method} {target}");
        let (mut ours, mut theirs) = (ours.json(), theirs.json());
        // Each server's own address.
        for answer in [&mut ours, &mut theirs] {
            let headers = answer["headers"].as_array_mut().unwrap();
            headers.retain(|pair| pair[0] != "host");
        }
        assert_eq!(ours, theirs, "{method} {target}");
    }
    host.stop().await;
}

/// GHSA-xrvr-8678-5wp8 (wasmtime before 48.0.9): a guest cancels a stream
/// copy from the wrong end (`stream.cancel-write` on the readable end of
/// its request body, while a read of it is pending). Whatever wasmtime makes
/// of it (a trap, or a panic where it reaches a state it does not expect),
/// that request is a 500 and the host keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cancelled_from_the_wrong_end_fails_only_its_request() {
    use bytes::Bytes;
    use http_body_util::BodyExt;
    let dir = tempfile::tempdir().unwrap();
    let host = host_with(dir.path(), &[("cancel", "cancel-p3")]).await;
    for _ in 0..3 {
        // The body is held back until the answer is in, so the guest's
        // read is pending when it cancels, however slow the machine.
        let (tx, rx) = tokio::sync::mpsc::channel::<
            Result<http_body::Frame<Bytes>, std::convert::Infallible>,
        >(1);
        let body = http_body_util::StreamBody::new(common::stream_of(rx));
        let request = http::Request::post(format!("{}/fn/cancel/wrong-end", host.url))
            .body(body)
            .unwrap();
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        let response = client.request(request).await.unwrap();
        let status = response.status();
        let text =
            String::from_utf8_lossy(&response.into_body().collect().await.unwrap().to_bytes())
                .into_owned();
        drop(tx);
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{text}");
        let ok = host.get("/fn/cancel/").await;
        assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
        assert_eq!(ok.text(), "ok\n");
    }
    assert_eq!(host.get("/healthz").await.status, StatusCode::OK);
    host.stop().await;
}
