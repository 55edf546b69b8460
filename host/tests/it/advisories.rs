//! Regression tests for wasmtime advisories that affect this build until
//! the registry serves wasmtime-wasi 48.0.9 (`cargo info wasmtime-wasi@48.0.9`): each
//! drives the advisory's path from a real guest against the real `lichen`
//! binary and checks the host holds. (GHSA-xrvr-8678-5wp8 is `p3.rs`'s
//! `cancel-p3` test.)
#![allow(clippy::unwrap_used)]

use crate::common;

use std::time::Duration;

use common::{Ca, component, send, send_request_within, spawn_lichen, tls_connect, tls_get};
use http::{Method, StatusCode};

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    kib * 1024
}

/// How long one call of 300,000 empty writes may take: seconds on a quiet
/// machine, many more in a debug build on a loaded one. The deadline of
/// `raw`'s policy and the client's wait are both set to it, so the test
/// measures memory, never the machine's speed.
const LONG_CALL: Duration = Duration::from_secs(600);

/// Starts the real binary on `data`, deploys `raw-wasi` as `raw` with a
/// deadline of [`LONG_CALL`], and returns the running host with its URL.
async fn host_with_raw(data: &std::path::Path) -> (common::Spawned, String) {
    common::write_policy(data, "raw", "[limits]\ntimeout = \"10m\"\n");
    let (child, url, _log) = spawn_lichen(data, &[]);
    let token = std::fs::read_to_string(data.join("admin-token")).unwrap();
    let deployed = send(
        Method::PUT,
        &format!("{url}/v1/functions/raw"),
        &[("authorization", &format!("Bearer {}", token.trim()))],
        component("raw-wasi"),
    )
    .await;
    assert_eq!(deployed.status, StatusCode::CREATED, "{}", deployed.text());
    (child, url)
}

/// Fails if the host grew by 32 MiB or more since `before`.
fn assert_still_within(pid: u32, before: u64, what: &str) {
    let grown = rss_bytes(pid).saturating_sub(before);
    eprintln!("RSS grew by {} KiB", grown >> 10);
    assert!(
        grown < 32 << 20,
        "{what} grew the host by {} MiB",
        grown >> 20
    );
}

/// GHSA-5m8g-xhq4-4h93: empty writes to an output stream could grow host
/// memory without bound. 900,000 empty writes to a response body and as
/// many to stdout (each waiting its turn, as the interface asks) leave the
/// host's memory where it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_writes_do_not_pile_up_in_host_memory() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (mut child, url) = host_with_raw(&data).await;
    let call = |n: u64| {
        let request = http::Request::get(format!("{url}/fn/raw/empty-writes?n={n}"))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        send_request_within(LONG_CALL, request)
    };
    // Warm: the instance pool, the allocator's caches.
    for _ in 0..3 {
        call(1000).await;
    }
    let before = rss_bytes(child.id());
    for _ in 0..3 {
        let reply = call(300_000).await;
        assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text());
        assert!(
            reply.text().starts_with("raw wasi component saw"),
            "{}",
            reply.text()
        );
    }
    assert_still_within(child.id(), before, "1.8 million empty writes");
    child.kill().unwrap();
    child.wait().unwrap();
}

/// GHSA-f8mm-ggr3-89wh: under HTTP/2, empty body writes could grow the
/// heap without bound. The same 900,000 empty writes to a response body,
/// answered over HTTP/2 (TLS, ALPN h2), leave the host's memory where it
/// was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_writes_over_http2_do_not_pile_up_in_host_memory() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Deployed over plain HTTP; the TLS host after it finds it stored.
    let (mut plain, _) = host_with_raw(&data).await;
    plain.kill().unwrap();
    plain.wait().unwrap();

    let ca = Ca::new();
    let (cert, key) = ca.leaf(&["localhost"], "lichen", false);
    let (cert_file, key_file) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert_file, cert).unwrap();
    std::fs::write(&key_file, key).unwrap();
    let (mut child, url, _log) = spawn_lichen(
        &data,
        &[
            "--tls-cert",
            cert_file.to_str().unwrap(),
            "--tls-key",
            key_file.to_str().unwrap(),
        ],
    );
    let addr = url.trim_start_matches("https://").to_string();
    let call = |n: u64| {
        let (ca, addr) = (&ca, addr.clone());
        async move {
            let tls = tls_connect(ca, &addr, "localhost", &[b"h2"]).await.unwrap();
            assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
            let path = format!("/fn/raw/empty-writes?n={n}");
            tokio::time::timeout(LONG_CALL, tls_get(tls, &path))
                .await
                .expect("the host answers within LONG_CALL")
        }
    };
    for _ in 0..3 {
        call(1000).await;
    }
    let before = rss_bytes(child.id());
    for _ in 0..3 {
        let (status, body) = call(300_000).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        assert!(body.starts_with(b"raw wasi component saw"), "{body:?}");
    }
    assert_still_within(child.id(), before, "1.8 million empty writes over HTTP/2");
    child.kill().unwrap();
    child.wait().unwrap();
}
