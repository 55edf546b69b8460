//! The gradient-descent example on one host: `functions/linreg` under its
//! policy (`policies/linreg.toml`) and the `lichen train` driver. The
//! three-host run, with a host killed mid-training, is in `cluster.rs`.
#![allow(clippy::unwrap_used)]

use crate::common;

use common::{TestHost, component, repo_root, send, test_config, write_policy};
use http::{Method, StatusCode};
use lichen::client::Target;
use lichen::train::{Outcome, Settings, train};
use serde_json::{Value, json};

/// How close the fitted theta must come to the one the data was made from:
/// with 4,000 rows and noise 0.1 the least-squares estimate itself is about
/// 0.003 from it per coefficient, and 50 steps leave well under that.
const TOLERANCE: f64 = 0.02;

async fn host_with_linreg(dir: &std::path::Path) -> TestHost {
    let policy = std::fs::read_to_string(repo_root().join("policies/linreg.toml")).unwrap();
    write_policy(dir, "linreg", &policy);
    let host = TestHost::start(test_config(dir)).await;
    let deployed = host.deploy("linreg", component("linreg")).await;
    assert_eq!(deployed.status, StatusCode::CREATED, "{}", deployed.text());
    host
}

fn target(host: &TestHost) -> Target {
    Target {
        url: host.url.clone(),
        token: host.token.clone(),
        ca_cert: None,
    }
}

fn settings(seed: u64) -> Settings {
    Settings {
        shards: 8,
        rows: 500,
        steps: 50,
        seed,
        ..Settings::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gradient_descent_converges_to_the_true_theta_and_repeats_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let host = host_with_linreg(dir.path()).await;
    let target = target(&host);

    let first: Outcome = train(&target, &settings(7), |_| {}).await.unwrap();
    assert_eq!(first.steps.len(), 50);
    let losses: Vec<f64> = first.steps.iter().map(|s| s.loss).collect();
    // Falling at every step after the first few.
    for (i, pair) in losses.windows(2).enumerate().skip(3) {
        assert!(
            pair[1] <= pair[0],
            "loss rose at step {}: {losses:?}",
            i + 2
        );
    }
    assert!(first.final_loss < losses[0] / 10.0, "{losses:?}");
    // The noise's own share of the loss is 0.1² / 2.
    assert!(first.final_loss < 0.006, "{}", first.final_loss);
    assert!(
        first.distance < TOLERANCE,
        "theta {:?} is {} from {:?}",
        first.theta,
        first.distance,
        first.true_theta
    );
    // The rows crossed once; a step moves theta and gradients only.
    let step_bytes = first.steps.iter().map(|s| s.bytes).max().unwrap();
    assert!(
        step_bytes * 100 < first.loaded_bytes,
        "{step_bytes} bytes a step against {} loaded",
        first.loaded_bytes
    );
    // No cluster: nothing says who served the items.
    assert!(first.steps.iter().all(|s| s.served_by.is_empty()));

    // The same seed: the same data, the same steps, to the bit.
    let again = train(&target, &settings(7), |_| {}).await.unwrap();
    assert_eq!(again.theta, first.theta);
    assert_eq!(again.true_theta, first.true_theta);
    let again_losses: Vec<f64> = again.steps.iter().map(|s| s.loss).collect();
    assert_eq!(again_losses, losses);
    // Another seed: other data.
    let other = train(&target, &settings(8), |_| {}).await.unwrap();
    assert_ne!(other.true_theta, first.true_theta);
    assert!(other.distance < TOLERANCE);
    host.stop().await;
}

/// The host the driver talks to stops mid-training and comes back on the
/// same address and data directory: the step that was under way is tried
/// again once it is back, and the run ends where an undisturbed one does,
/// on the shards its key-value store kept on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_restarting_mid_training_costs_a_retry_not_the_run() {
    use std::time::Duration;

    let dir = tempfile::tempdir().unwrap();
    let host = host_with_linreg(dir.path()).await;
    let target = target(&host);
    let settings = Settings {
        steps: 30,
        ..settings(3)
    };
    let calm = train(&target, &settings, |_| {}).await.unwrap();
    assert!(calm.steps.iter().all(|s| s.retried == 0));

    // At step 5 the driver waits (its callback blocks) until the host has
    // stopped, so the next step is sure to find it gone.
    let (reached, at_five) = tokio::sync::oneshot::channel();
    let mut reached = Some(reached);
    let (stopped, resume) = std::sync::mpsc::channel::<()>();
    let again = Settings {
        load: false,
        ..settings
    };
    let run = {
        let target = target.clone();
        tokio::spawn(async move {
            train(&target, &again, move |s| {
                if s.step == 5 {
                    if let Some(reached) = reached.take() {
                        let _ = reached.send(());
                    }
                    let _ = tokio::task::block_in_place(|| {
                        resume.recv_timeout(Duration::from_secs(60))
                    });
                }
            })
            .await
        })
    };
    tokio::time::timeout(Duration::from_secs(60), at_five)
        .await
        .expect("training reached step 5")
        .unwrap();
    let address = host.url.trim_start_matches("http://").parse().unwrap();
    host.stop().await;
    // Down until an attempt has found no host there: the test holds the
    // address and hangs up on the driver's first connection.
    let stand_in = tokio::net::TcpListener::bind(address).await.unwrap();
    stopped.send(()).unwrap();
    let attempt = tokio::time::timeout(common::PATIENCE, stand_in.accept())
        .await
        .expect("the driver tries the host again")
        .unwrap();
    drop((attempt, stand_in));
    let mut config = test_config(dir.path());
    config.listen = address;
    let host = TestHost::start(config).await;

    let restarted = run.await.unwrap().unwrap();
    assert_eq!(restarted.steps.len(), 30);
    let retried: usize = restarted.steps.iter().map(|s| s.retried).sum();
    assert!(retried > 0, "nothing was tried again: {restarted:?}");
    assert_eq!(restarted.theta, calm.theta);
    assert_eq!(restarted.final_loss, calm.final_loss);
    host.stop().await;
}

/// The map's results for `items` sent to `path` of linreg.
async fn map(host: &TestHost, path: &str, items: Value) -> Vec<Value> {
    let reply = send(
        Method::POST,
        &format!("{}/v1/functions/linreg/map?path={path}", host.url),
        &[("authorization", &format!("Bearer {}", host.token))],
        items.to_string().into_bytes(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    reply.json().as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_fails_only_its_own_item_with_a_400_that_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let host = host_with_linreg(dir.path()).await;

    let loaded = map(
        &host,
        "/load",
        json!([
            { "shard": "s0", "rows": [[0.0, 1.0], [1.0, 3.0]] },
            { "shard": "s1", "rows": [[0.0, 1.0], [1.0, "three"]] },
        ]),
    )
    .await;
    assert_eq!(loaded[0]["status"], 200, "{loaded:?}");
    assert_eq!(loaded[0]["body"]["rows"], 2);
    assert_eq!(loaded[1]["status"], 400);
    assert!(
        loaded[1]["body"]["error"]
            .as_str()
            .unwrap()
            .contains("row 1"),
        "{loaded:?}"
    );

    let grads = map(
        &host,
        "/grad",
        json!([
            { "shard": "s0", "theta": [1.0, 2.0] },
            { "shard": "s1", "theta": [1.0, 2.0] },
            { "shard": "s0", "theta": [1.0, 2.0, 3.0] },
            { "shard": "s0", "theta": [1.0, "two"] },
        ]),
    )
    .await;
    let statuses: Vec<u64> = grads
        .iter()
        .map(|g| g["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, [200, 400, 400, 400], "{grads:?}");
    assert_eq!(grads[0]["body"]["loss"], 0.0);
    let says = |i: usize, part: &str| {
        let error = grads[i]["body"]["error"].as_str().unwrap();
        assert!(error.contains(part), "item {i}: {error}");
    };
    says(1, "no shard \"s1\"");
    says(2, "theta has 3 values");
    says(3, "theta[1] is not a number");

    // The path must be a path.
    let reply = host
        .admin(
            Method::POST,
            "/v1/functions/linreg/map?path=grad",
            b"[]".to_vec(),
        )
        .await;
    reply.assert_error(StatusCode::BAD_REQUEST, "invalid_map");

    // The driver stops on a bad item and says which: theta of the wrong
    // length for the shards stored under the same ids.
    let error = train(
        &target(&host),
        &Settings {
            shards: 1,
            features: 2,
            load: false,
            ..Settings::default()
        },
        |_| {},
    )
    .await
    .unwrap_err();
    let error = format!("{error:#}");
    assert!(
        error.contains("shard \"s0\"") && error.contains("theta has 3 values"),
        "{error}"
    );
    host.stop().await;
}

/// `lichen train` as a person runs it: a line per step, then the result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_prints_each_step_and_the_distance() {
    let dir = tempfile::tempdir().unwrap();
    let host = host_with_linreg(dir.path()).await;
    let (url, token) = (host.url.clone(), host.token.clone());
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_lichen"))
            .args(["train", "--shards", "3", "--rows", "200", "--steps", "5"])
            .args(["--url", &url, "--token", &token])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let steps: Vec<&str> = stdout.lines().filter(|l| l.starts_with("step")).collect();
    assert_eq!(steps.len(), 5, "{stdout}");
    assert!(steps[4].starts_with("step   5  loss "), "{stdout}");
    assert!(stdout.contains("distance to the true theta: "), "{stdout}");
    assert!(stdout.contains("bytes of rows, once"), "{stdout}");
    host.stop().await;
}
