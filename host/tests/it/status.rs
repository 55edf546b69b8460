//! `GET /v1/status`: the numbers the status page shows, from a real host
//! with real components.
#![allow(clippy::unwrap_used)]

use crate::common;

use common::{TestHost, component, test_config, write_policy};
use http::{Method, StatusCode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_counts_calls_traps_and_keeps_recent_invocations_and_log_lines() {
    let dir = tempfile::tempdir().unwrap();
    write_policy(dir.path(), "broken", "[limits]\nmemory = \"lots\"\n");
    let host = TestHost::start(test_config(dir.path())).await;
    for name in ["hello", "trap"] {
        host.deploy(name, component(name)).await;
    }
    host.deploy("broken", component("hello")).await;
    for _ in 0..50 {
        assert_eq!(host.get("/fn/hello").await.status, StatusCode::OK);
    }
    assert_eq!(
        host.get("/fn/trap/panic").await.status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(host.get("/fn/trap/log").await.status, StatusCode::OK);

    let status = host.admin(Method::GET, "/v1/status", Vec::new()).await;
    assert_eq!(status.status, StatusCode::OK, "{}", status.text());
    let status = status.json();
    let row = |name: &str| {
        status["functions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == name)
            .cloned()
            .unwrap()
    };
    let hello = row("hello");
    assert_eq!(hello["invocations"]["ok"], 50);
    assert!(hello["requests_per_second"].as_f64().unwrap() > 0.0);
    assert!(hello["p50_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(hello["history"].as_array().unwrap().len(), 60);
    assert_eq!(
        hello["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_u64().unwrap())
            .sum::<u64>(),
        50
    );
    assert_eq!(hello["public"], true);
    assert!(hello["memory_peak_bytes"].as_u64().unwrap() > 0);
    assert_eq!(row("trap")["invocations"]["trap"], 1);
    assert!(
        row("broken")["policy_error"]
            .as_str()
            .unwrap()
            .contains("memory"),
        "{}",
        row("broken")
    );
    assert_eq!(status["host"]["functions"], 3);
    assert!(status["host"]["rss_bytes"].as_u64().unwrap() > 0);
    assert!(status["cluster"].is_null());

    let detail = host
        .admin(Method::GET, "/v1/status?function=trap", Vec::new())
        .await
        .json();
    let trap = &detail["function"];
    let calls = trap["invocations"].as_array().unwrap();
    assert_eq!(calls.len(), 2);
    // Newest first.
    assert_eq!(calls[0]["status"], 200);
    assert_eq!(calls[1]["outcome"], "trap");
    let log = trap["log"].as_array().unwrap();
    // The line `/log` wrote, with the request that wrote it (the panic's
    // message, from the request before, is there too).
    let line = log
        .iter()
        .find(|l| l["line"] == "a line on stdout")
        .unwrap_or_else(|| panic!("{log:?}"));
    assert_eq!(line["stream"], "stdout");
    assert_eq!(line["request_id"], calls[0]["request_id"]);
    assert!(
        log.iter()
            .any(|l| l["request_id"] == calls[1]["request_id"] && l["stream"] == "stderr"),
        "{log:?}"
    );
    host.admin(Method::GET, "/v1/status?function=nope", Vec::new())
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    host.admin(Method::GET, "/v1/status?function=Bad_Name", Vec::new())
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_name");
    let unauthorized = host.get("/v1/status").await;
    assert_eq!(unauthorized.status, StatusCode::UNAUTHORIZED);
    host.stop().await;
}
