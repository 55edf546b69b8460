//! A host whose clock runs ahead cannot drag the cluster's clocks with it:
//! what it stamps beyond `--max-clock-ahead` is refused and counted by its
//! peers, never adopted (issue 41, "a bounded clock").

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{Method, StatusCode};

use super::{Node, SECRET};
use crate::common::{self, component, eventually, series_sum};

/// c's wall clock runs three minutes ahead (libfaketime): inside the five
/// minutes gossip datagrams are taken in, beyond the 60 s bound on stamps.
/// Its deploy and its secret are refused on a and b and counted; a's
/// deploy afterwards is stamped within the bound of real time, and reaches
/// every host, c included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_whose_clock_runs_ahead_cannot_drag_the_clusters_stamps() {
    let root = tempfile::tempdir().unwrap();
    let a = Node::start(root.path(), "a", &[], SECRET);
    let b = Node::start(root.path(), "b", &[&a], SECRET);
    let gossip = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let faketime = common::libfaketime();
    let c = Node::launch_env(
        root.path(),
        "c",
        &gossip,
        &[&a],
        SECRET,
        &[],
        &[
            ("LD_PRELOAD", faketime.to_str().unwrap()),
            ("FAKETIME", "+180"),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ],
    );
    eventually("a sees b and c", || async {
        a.peer_ids().await == ["b", "c"]
    })
    .await;

    // c deploys hello and sets a secret: stamped three minutes ahead.
    let deployed = c
        .admin(Method::PUT, "/v1/functions/hello", component("hello"))
        .await;
    assert_eq!(deployed.status, StatusCode::CREATED, "{}", deployed.text());
    let created = deployed.json()["created_unix"].as_u64().unwrap();
    assert!(
        created > unix_s() + 120,
        "c's clock does not run ahead: {created} vs {}",
        unix_s()
    );
    let set = c
        .admin(
            Method::PUT,
            "/v1/secrets/api-key",
            b"from-the-future".to_vec(),
        )
        .await;
    assert!(set.status.is_success(), "{}", set.text());
    for node in [&a, &b] {
        eventually(
            &format!("{} refuses c's entry and secret", node.id),
            || async {
                let metrics = node.metrics().await;
                series_sum(
                    &metrics,
                    "lichen_clock_ahead_refused_total{source=\"registry\"}",
                ) >= 1.0
                    && series_sum(
                        &metrics,
                        "lichen_clock_ahead_refused_total{source=\"secret\"}",
                    ) >= 1.0
            },
        )
        .await;
    }
    // Not adopted, however long one waits for it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for node in [&a, &b] {
        node.post("/fn/hello", "")
            .await
            .assert_error(StatusCode::NOT_FOUND, "not_found");
        let secrets = node.admin(Method::GET, "/v1/secrets", Vec::new()).await;
        assert!(
            !secrets.text().contains("api-key"),
            "{} took c's secret: {}",
            node.id,
            secrets.text()
        );
    }

    // a's clock did not move: its deploy is stamped now, and every host,
    // c included, serves it.
    let deployed = a
        .admin(Method::PUT, "/v1/functions/square", component("square"))
        .await;
    assert_eq!(deployed.status, StatusCode::CREATED, "{}", deployed.text());
    let created = deployed.json()["created_unix"].as_u64().unwrap();
    let now = unix_s();
    assert!(
        created <= now + 60,
        "a's stamp ran ahead with c's: {created} vs {now}"
    );
    for node in [&b, &c] {
        eventually(&format!("{} serves a's square", node.id), || async {
            node.post("/fn/square", "4").await.status == StatusCode::OK
        })
        .await;
    }
    // c counted nothing: a's stamps are behind its clock, not ahead.
    assert_eq!(
        series_sum(&c.metrics().await, "lichen_clock_ahead_refused_total"),
        0.0
    );
}

fn unix_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}
