//! `/metrics` after real invocations: exact counters for a known mix,
//! `promtool check metrics` on the live text, bounded labels, and series that
//! go with their function.
#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

use crate::common;

use common::{TestHost, component, metric_value, send, test_config, write_policy};
use http::{Method, StatusCode};

/// The value of one series, selected by its exact label set as rendered.
fn series(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(name_and_labels)?
            .strip_prefix(' ')?
            .parse()
            .ok()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_match_a_known_mix_of_invocations() {
    let dir = tempfile::tempdir().unwrap();
    write_policy(dir.path(), "probe", "[limits]\ntimeout = \"500ms\"\n");
    write_policy(dir.path(), "echo", "[limits]\nrequest_body = \"1KiB\"\n");
    let host = TestHost::start(test_config(dir.path())).await;
    for (name, fixture) in [
        ("hello", "hello"),
        ("trap", "trap"),
        ("probe", "probe"),
        ("echo", "echo"),
    ] {
        assert_eq!(
            host.deploy(name, component(fixture)).await.status,
            StatusCode::CREATED
        );
    }
    for _ in 0..3 {
        assert_eq!(host.get("/fn/hello").await.status, StatusCode::OK);
    }
    for _ in 0..2 {
        assert_eq!(
            host.get("/fn/trap/panic").await.status,
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
    assert_eq!(host.get("/fn/trap/error").await.status.as_u16(), 418);
    assert_eq!(
        host.get("/fn/probe/spin").await.status,
        StatusCode::GATEWAY_TIMEOUT
    );
    let big = send(
        Method::POST,
        &format!("{}/fn/echo", host.url),
        &[],
        vec![0; 2048],
    )
    .await;
    assert_eq!(big.status, StatusCode::PAYLOAD_TOO_LARGE);
    for _ in 0..2 {
        assert_eq!(host.get("/fn/nobody").await.status, StatusCode::NOT_FOUND);
    }

    let text = host.get("/metrics").await.text();
    let expect = [
        (
            r#"lichen_invocations_total{function="hello",outcome="ok"}"#,
            3.0,
        ),
        (
            r#"lichen_invocations_total{function="trap",outcome="trap"}"#,
            2.0,
        ),
        (
            r#"lichen_invocations_total{function="trap",outcome="guest_error"}"#,
            1.0,
        ),
        (
            r#"lichen_invocations_total{function="probe",outcome="timeout"}"#,
            1.0,
        ),
        (
            r#"lichen_invocations_total{function="echo",outcome="rejected"}"#,
            1.0,
        ),
        (
            r#"lichen_invocation_duration_seconds_count{function="hello"}"#,
            3.0,
        ),
        (
            r#"lichen_invocation_duration_seconds_count{function="trap"}"#,
            3.0,
        ),
        (
            r#"lichen_instantiate_duration_seconds_count{function="hello"}"#,
            3.0,
        ),
        (r#"lichen_inflight{function="hello"}"#, 0.0),
        (r#"lichen_queued{function="hello"}"#, 0.0),
        ("lichen_unknown_function_requests_total", 2.0),
        (r#"lichen_deploys_total{outcome="ok"}"#, 4.0),
        ("lichen_functions", 4.0),
        ("lichen_compile_duration_seconds_count", 4.0),
        (r#"lichen_build_info{version="0.1.0"}"#, 1.0),
    ];
    for (series_name, value) in expect {
        assert_eq!(
            series(&text, series_name),
            Some(value),
            "{series_name} in\n{text}"
        );
    }
    assert_eq!(metric_value(&text, "lichen_invocations_total"), 8.0);
    // The rejected request never ran, so it was not instantiated.
    assert_eq!(
        series(
            &text,
            r#"lichen_instantiate_duration_seconds_count{function="echo"}"#
        ),
        None
    );
    let peak = series(&text, r#"lichen_memory_peak_bytes{function="hello"}"#).unwrap();
    assert!(peak >= 65536.0, "hello's memory peak is {peak}");
    assert!(metric_value(&text, "process_resident_memory_bytes") > 0.0);
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_the_live_output() {
    // Debian's prometheus package: the test command installs it, and so
    // does this test where it is missing; it never skips.
    let promtool = std::path::Path::new("/usr/bin/promtool");
    if !promtool.exists() {
        let status = std::process::Command::new(common::repo_root().join("scripts/apt-install.sh"))
            .arg("prometheus")
            .status()
            .expect("running scripts/apt-install.sh");
        assert!(status.success(), "installing promtool failed");
    }
    let dir = tempfile::tempdir().unwrap();
    let host = TestHost::start(test_config(dir.path())).await;
    host.deploy("hello", component("hello")).await;
    host.get("/fn/hello").await;
    host.get("/fn/missing").await;
    let text = host.get("/metrics").await.text();
    let output = common::run_with_input(
        std::process::Command::new(promtool).args(["check", "metrics"]),
        text.as_bytes(),
    );
    assert!(
        output.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labels_stay_bounded_and_go_with_their_function() {
    let dir = tempfile::tempdir().unwrap();
    let host = TestHost::start(test_config(dir.path())).await;
    host.deploy("hello", component("hello")).await;
    host.deploy("doomed", component("hello")).await;
    for i in 0..1000u32 {
        let path = format!("/fn/hello/{i:x}/{}", i.wrapping_mul(2654435761));
        assert_eq!(host.get(&path).await.status, StatusCode::OK);
        let unknown = format!("/fn/fn-{i}/x");
        assert_eq!(host.get(&unknown).await.status, StatusCode::NOT_FOUND);
    }
    host.get("/fn/doomed").await;
    let text = host.get("/metrics").await.text();
    let mut functions: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split("function=\"").nth(1)?.split('"').next())
        .collect();
    functions.sort();
    functions.dedup();
    assert_eq!(functions, ["doomed", "hello"]);
    assert_eq!(
        series(
            &text,
            r#"lichen_invocations_total{function="hello",outcome="ok"}"#
        ),
        Some(1000.0)
    );

    let deleted = host
        .admin(Method::DELETE, "/v1/functions/doomed", Vec::new())
        .await;
    assert_eq!(deleted.status, StatusCode::OK);
    let text = host.get("/metrics").await.text();
    assert!(!text.contains("doomed"), "{text}");
    assert!(text.contains(r#"function="hello""#));
    assert_eq!(series(&text, "lichen_functions"), Some(1.0));
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_can_require_the_admin_token() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.metrics_require_token = true;
    let host = TestHost::start(config).await;
    assert_eq!(host.get("/metrics").await.status, StatusCode::UNAUTHORIZED);
    let with_token = host.admin(Method::GET, "/metrics", Vec::new()).await;
    assert_eq!(with_token.status, StatusCode::OK);
    assert!(with_token.text().contains("lichen_functions"));
    host.stop().await;
}
