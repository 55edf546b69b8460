//! Instance reuse, opt-in per function (`[instances]`), driven by a guest
//! that counts the requests its instance has served (`probe`'s `/count`),
//! for each ABI: a fresh instance per request unless the policy says
//! otherwise, `reuse` requests per instance at most, and an instance retired
//! by a trap, a redeploy or a policy edit.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::time::{Duration, Instant};

use common::{TestHost, component, distinct, eventually, host_with, write_policy};
use http::{Method, StatusCode};

async fn counts(host: &TestHost, n: usize) -> Vec<String> {
    let mut seen = Vec::new();
    for _ in 0..n {
        let reply = host.get("/fn/probe/count").await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        seen.push(reply.text());
    }
    seen
}

/// Polls until `/count` answers 1: a fresh instance serves.
async fn until_fresh(host: &TestHost) {
    let started = Instant::now();
    while host.get("/fn/probe/count").await.text() != "1" {
        assert!(
            started.elapsed() < common::PATIENCE,
            "no fresh instance within {:?}",
            common::PATIENCE
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_reuse_no_two_requests_share_an_instance() {
    for fixture in ["probe", "probe-p3"] {
        for policy in ["", "[instances]\nreuse = 1\n"] {
            let dir = tempfile::tempdir().unwrap();
            write_policy(dir.path(), "probe", policy);
            let host = host_with(dir.path(), &[("probe", fixture)]).await;
            assert_eq!(counts(&host, 4).await, ["1", "1", "1", "1"], "{fixture}");
            host.stop().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_serves_at_most_reuse_requests() {
    for fixture in ["probe", "probe-p3"] {
        let dir = tempfile::tempdir().unwrap();
        write_policy(dir.path(), "probe", "[instances]\nreuse = 3\n");
        let host = host_with(dir.path(), &[("probe", fixture)]).await;
        assert_eq!(
            counts(&host, 7).await,
            ["1", "2", "3", "1", "2", "3", "1"],
            "{fixture}"
        );
        // An instance is retired after its last answer has gone out, so
        // the count may come a moment after the answer.
        for (event, at_least) in [("created", 3.0), ("reused", 4.0), ("retired", 2.0)] {
            let series = format!("lichen_instances_total{{event=\"{event}\",function=\"probe\"}}");
            eventually(&format!("{fixture}: {series} >= {at_least}"), || async {
                let metrics = host.get("/metrics").await.text();
                metrics
                    .lines()
                    .find_map(|l| l.strip_prefix(&series)?.trim().parse::<f64>().ok())
                    .is_some_and(|value| value >= at_least)
            })
            .await;
        }
        host.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trap_a_redeploy_and_a_policy_edit_retire_instances() {
    for fixture in ["probe", "probe-p3"] {
        let dir = tempfile::tempdir().unwrap();
        write_policy(dir.path(), "probe", "[instances]\nreuse = 100\n");
        let host = host_with(dir.path(), &[("probe", fixture)]).await;
        assert_eq!(counts(&host, 2).await, ["1", "2"], "{fixture}");

        // A trap: the next request gets a fresh instance.
        host.get("/fn/probe/recurse")
            .await
            .assert_error(StatusCode::INTERNAL_SERVER_ERROR, "trap");
        assert_eq!(counts(&host, 2).await, ["1", "2"], "{fixture} after a trap");

        // A redeploy (other bytes, same behaviour): a fresh instance.
        let redeployed = host
            .deploy("probe", distinct(&component(fixture), "v2"))
            .await;
        assert_eq!(redeployed.status, StatusCode::CREATED);
        assert_eq!(
            counts(&host, 2).await,
            ["1", "2"],
            "{fixture} after a redeploy"
        );

        // A policy edit: instances of the old policy are not reused.
        let put = host
            .admin(
                Method::PUT,
                "/v1/functions/probe/policy",
                b"[instances]\nreuse = 50\n".to_vec(),
            )
            .await;
        assert_eq!(put.status, StatusCode::OK, "{}", put.text());
        until_fresh(&host).await;
        assert_eq!(
            counts(&host, 1).await,
            ["2"],
            "{fixture} after a policy edit"
        );
        host.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_instance_is_stopped_at_its_deadline_and_retired() {
    for fixture in ["probe", "probe-p3"] {
        let dir = tempfile::tempdir().unwrap();
        write_policy(
            dir.path(),
            "probe",
            "[limits]\ntimeout = \"1s\"\n[instances]\nreuse = 10\n",
        );
        let host = host_with(dir.path(), &[("probe", fixture)]).await;
        assert_eq!(counts(&host, 2).await, ["1", "2"], "{fixture}");
        let started = Instant::now();
        host.get("/fn/probe/spin")
            .await
            .assert_error(StatusCode::GATEWAY_TIMEOUT, "timeout");
        // Stopped by the 1 s deadline, not by the guest (it spins for ever).
        assert!(started.elapsed() < Duration::from_secs(30), "{fixture}");
        until_fresh(&host).await;
        host.stop().await;
    }
}

/// A WASIp3 instance serves up to `concurrency` requests at once, never
/// more (which instance takes which request is the scheduler's choice); with
/// `concurrency = 1` each serves one at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_p3_instance_serves_up_to_concurrency_requests_at_once() {
    for (per_instance, requests) in [(4, 6), (1, 3)] {
        let dir = tempfile::tempdir().unwrap();
        write_policy(
            dir.path(),
            "slow",
            &format!(
                "[limits]\nconcurrency = 8\n[instances]\nreuse = 100\nconcurrency = {per_instance}\nidle = \"10s\"\n"
            ),
        );
        let host = host_with(dir.path(), &[("slow", "slow-p3")]).await;
        assert_eq!(host.get("/fn/slow/wait?ms=0").await.status, StatusCode::OK);

        // Each waits long enough that all are in flight together however
        // slowly they arrive.
        let calls = (0..requests).map(|_| {
            let url = format!("{}/fn/slow/wait?ms=5000", host.url);
            tokio::spawn(async move { common::send(Method::GET, &url, &[], Vec::new()).await })
        });
        let mut most_at_once = Vec::new();
        let mut instances = std::collections::BTreeSet::new();
        for reply in futures::future::join_all(calls).await {
            let reply = reply.unwrap();
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
            most_at_once.push(reply.json()["most_at_once"].as_u64().unwrap());
            instances.insert(reply.json()["instance"].as_str().unwrap().to_string());
        }
        // Instances side by side: more requests at once than one instance
        // may take went to several.
        let most = *most_at_once.iter().max().unwrap();
        if per_instance == 1 {
            assert_eq!(most, 1, "{most_at_once:?}");
            assert_eq!(instances.len(), requests, "{instances:?}");
        } else {
            assert!((2..=per_instance).contains(&most), "{most_at_once:?}");
            assert!(instances.len() >= 2, "{instances:?}");
        }
        host.stop().await;
    }
}

/// The sum of a per-function series of `/metrics` for `function`.
async fn series(host: &TestHost, name: &str, labels: &str) -> f64 {
    let metrics = host.get("/metrics").await.text();
    let prefix = format!("{name}{{{labels}}}");
    metrics
        .lines()
        .filter_map(|line| line.strip_prefix(&prefix)?.trim().parse::<f64>().ok())
        .sum()
}

/// With an idle instance at hand, a request drives it on its own task:
/// nothing is handed to another task (no worker to wake, no answer to send
/// back). A request that joins a busy WASIp3 instance (the pool at its cap)
/// is one that is handed off, and is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_instance_is_driven_on_the_requests_own_task() {
    for fixture in ["probe", "probe-p3"] {
        let dir = tempfile::tempdir().unwrap();
        write_policy(
            dir.path(),
            "probe",
            "[instances]\nreuse = 1000\nidle = \"60s\"\n",
        );
        let host = host_with(dir.path(), &[("probe", fixture)]).await;
        let seen = counts(&host, 20).await;
        let expected: Vec<String> = (1..=20).map(|n| n.to_string()).collect();
        assert_eq!(seen, expected, "{fixture}: one instance served them all");
        let reused = series(
            &host,
            "lichen_instances_total",
            "event=\"reused\",function=\"probe\"",
        )
        .await;
        assert_eq!(reused, 19.0, "{fixture}");
        for reason in ["body", "joined"] {
            let labels = format!("function=\"probe\",reason=\"{reason}\"");
            let handoffs = series(&host, "lichen_guest_handoffs_total", &labels).await;
            assert_eq!(handoffs, 0.0, "{fixture}: no request left its own task");
        }
        host.stop().await;
    }

    // One instance of four requests at once, at its cap: three join it.
    let dir = tempfile::tempdir().unwrap();
    write_policy(
        dir.path(),
        "slow",
        "[limits]\nconcurrency = 8\ntimeout = \"60s\"\n[instances]\nreuse = 100\nconcurrency = 4\nmax = 1\nidle = \"60s\"\n",
    );
    let host = host_with(dir.path(), &[("slow", "slow-p3")]).await;
    let calls = (0..4).map(|_| {
        let url = format!("{}/fn/slow/wait?ms=2000", host.url);
        tokio::spawn(async move { common::send(Method::GET, &url, &[], Vec::new()).await })
    });
    for reply in futures::future::join_all(calls).await {
        let reply = reply.unwrap();
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    }
    let labels = "function=\"slow\",reason=\"joined\"";
    let handoffs = series(&host, "lichen_guest_handoffs_total", labels).await;
    assert!(
        handoffs >= 1.0,
        "joining a busy instance is counted: {handoffs}"
    );
    host.stop().await;
}

/// A pool never holds more instances than its cap: 64 requests at once
/// against a cap of 4 are all answered, by 4 instances at most (none is
/// retired here, so every one created was alive at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_requests_at_once_share_a_pool_capped_at_four() {
    for (fixture, name, path) in [
        ("probe", "probe", "/fn/probe/sleep?ms=20"),
        ("slow-p3", "slow", "/fn/slow/wait?ms=20"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        write_policy(
            dir.path(),
            name,
            "[limits]\nconcurrency = 64\nqueue = 64\ntimeout = \"120s\"\n[instances]\nreuse = 10000\nconcurrency = 4\nmax = 4\nidle = \"120s\"\n",
        );
        let host = host_with(dir.path(), &[(name, fixture)]).await;
        let calls = (0..64).map(|_| {
            let url = format!("{}{path}", host.url);
            tokio::spawn(async move { common::send(Method::GET, &url, &[], Vec::new()).await })
        });
        for reply in futures::future::join_all(calls).await {
            let reply = reply.unwrap();
            assert_eq!(reply.status, StatusCode::OK, "{fixture}: {}", reply.text());
        }
        let labels = |event: &str| format!("event=\"{event}\",function=\"{name}\"");
        let created = series(&host, "lichen_instances_total", &labels("created")).await;
        let retired = series(&host, "lichen_instances_total", &labels("retired")).await;
        assert!(
            (1.0..=4.0).contains(&created),
            "{fixture}: {created} created"
        );
        assert_eq!(retired, 0.0, "{fixture}");
        host.stop().await;
    }
}

/// An instance that cannot be created gives its place in the pool back:
/// with a cap of one and a memory limit below what the guest starts with,
/// every request fails at once with the reason, none waits for a place a
/// failed instance still holds (that would be a 504 after the deadline).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_cannot_be_created_gives_its_place_back() {
    for fixture in ["probe", "probe-p3"] {
        let dir = tempfile::tempdir().unwrap();
        write_policy(
            dir.path(),
            "probe",
            "[limits]\nmemory = \"64KiB\"\ntimeout = \"120s\"\n[instances]\nreuse = 8\nmax = 1\n",
        );
        let host = host_with(dir.path(), &[("probe", fixture)]).await;
        for _ in 0..3 {
            let reply = host.get("/fn/probe/count").await;
            assert_eq!(
                reply.status,
                StatusCode::INTERNAL_SERVER_ERROR,
                "{fixture}: {}",
                reply.text()
            );
            assert!(
                reply.text().contains("memory"),
                "{fixture}: {}",
                reply.text()
            );
        }
        host.stop().await;
    }
}
