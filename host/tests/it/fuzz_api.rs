//! Schema-driven fuzzing of a live host: schemathesis (PyPI) reads the
//! host's own `GET /v1/openapi.json` and sends every kind of request the
//! document allows (and many it does not), with the admin token, without
//! one, and with a wrong one. The examples are deployed, so invocations
//! reach real guests.
//!
//! Checks: every response conforms to the document (status, content type,
//! headers, schema), requests outside the schema are refused with a 4xx,
//! auth is never ignored, no 5xx but a guest's own and the documented
//! 503/504 (`schemathesis/lichen_checks.py`), and afterwards the host still
//! serves `hello`.
//!
//! Bounded: a fixed number of cases per operation and a time budget per
//! run. The seed is fixed so a failure reproduces; `LICHEN_FUZZ_SEED` picks
//! another to explore.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use common::{host_with, send};
use http::{Method, StatusCode};

/// The example functions, as `scripts/run.sh` deploys them.
const EXAMPLES: &[(&str, &str)] = &[
    ("hello", "hello"),
    ("echo", "echo"),
    ("square", "square"),
    ("fib", "fib"),
    ("hash", "hash"),
];

/// Cases per operation in the example and coverage phases; the fuzzing
/// phase repeats until its run's time budget (below) is spent.
const MAX_EXAMPLES: &str = "12";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The `st` command: `LICHEN_SCHEMATHESIS`, or the venv that
/// `scripts/install-schemathesis.sh` makes (run here if it is missing).
fn schemathesis() -> PathBuf {
    if let Some(path) = std::env::var_os("LICHEN_SCHEMATHESIS") {
        return PathBuf::from(path);
    }
    let installed = repo_root().join("target/tools/schemathesis/bin/st");
    if !installed.exists() {
        let status = Command::new(repo_root().join("scripts/install-schemathesis.sh"))
            .status()
            .expect("running scripts/install-schemathesis.sh");
        assert!(status.success(), "installing schemathesis failed");
    }
    installed
}

/// Runs schemathesis against `url` with extra `args`; panics with its
/// report if it found anything.
async fn fuzz(url: &str, label: &str, seconds: &str, args: &[&str]) {
    let st = schemathesis();
    let work = tempfile::tempdir().unwrap();
    let seed = std::env::var("LICHEN_FUZZ_SEED").unwrap_or_else(|_| "20261123".to_string());
    let mut command = Command::new(&st);
    command
        .current_dir(work.path())
        .env(
            "PYTHONPATH",
            repo_root().join("host/tests/schemathesis").as_os_str(),
        )
        .env("SCHEMATHESIS_HOOKS", "lichen_checks")
        .env("NO_COLOR", "1")
        .arg("--config-file")
        .arg(repo_root().join("host/tests/schemathesis/schemathesis.toml"))
        .args(["run", &format!("{url}/v1/openapi.json")])
        .args(["--url", url])
        .args(["--max-examples", MAX_EXAMPLES])
        .args(["--max-time", seconds])
        .args(["--seed", &seed])
        // One worker: CPython 3.11's parser is not safe across threads
        // (schemathesis parses sources while generating).
        .args(["--workers", "1"])
        .args(["--request-timeout", "30"])
        .args(["--suppress-health-check", "all"])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(["--no-color", "--output-truncate", "false"])
        .args(args);
    let started = Instant::now();
    // The host runs on this test's runtime: wait for schemathesis off it.
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("running {}: {e}", st.display()));
    let report = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!(
        "schemathesis ({label}, seed {seed}) took {:.0?}",
        started.elapsed()
    );
    assert!(
        output.status.success(),
        "schemathesis ({label}, seed {seed}) found problems:\n{report}"
    );
    // A run that tested nothing passes vacuously.
    assert!(
        report.contains("passed") && !report.contains("No operations"),
        "schemathesis ({label}) ran no tests:\n{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_host_holds_to_its_openapi_document() {
    let dir = tempfile::tempdir().unwrap();
    let host = host_with(dir.path(), EXAMPLES).await;
    let token = format!("Authorization: Bearer {}", host.token);

    // A minute and a half in all (the test command runs the others beside
    // it): most time where the token opens every route.
    fuzz(&host.url, "admin token", "50", &["-H", &token]).await;
    fuzz(&host.url, "no token", "20", &[]).await;
    let wrong = ["-H", "Authorization: Bearer not-the-token"];
    fuzz(&host.url, "wrong token", "20", &wrong).await;

    // Still up, still serving, and every example still deployed.
    let hello = host.get("/fn/hello").await;
    assert_eq!(hello.status, StatusCode::OK, "{}", hello.text());
    assert_eq!(hello.text(), "Hello from Lichen!\n");
    let listed = host.admin(Method::GET, "/v1/functions", Vec::new()).await;
    let names: Vec<String> = listed.json()["functions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap().to_string())
        .collect();
    for (name, _) in EXAMPLES {
        assert!(names.contains(&name.to_string()), "{name} gone: {names:?}");
    }
    let health = send(
        Method::GET,
        &format!("{}/healthz", host.url),
        &[],
        Vec::new(),
    )
    .await;
    assert_eq!(health.status, StatusCode::OK);
    host.stop().await;
}
