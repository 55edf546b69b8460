//! The audit log on two hosts: one line per change made on each host, in
//! order, with the token that made it; a peer's changes recorded as
//! applied from it; a change acknowledged right before a `kill -9` still
//! there after the restart.

use http::{Method, StatusCode};

use super::{Node, SECRET, TOKEN, two_with};
use crate::common::{component, distinct, eventually, make_token, with_token};

/// The entries `node` made itself (not applied from a peer).
async fn own_entries(node: &Node) -> Vec<serde_json::Value> {
    let log = node.admin(Method::GET, "/v1/audit", Vec::new()).await;
    assert_eq!(log.status, StatusCode::OK, "{}", log.text());
    log.json()["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["applied_from_peer"].is_null())
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_change_is_one_line_in_order_with_its_token_and_survives_kill_9() {
    let root = tempfile::tempdir().unwrap();
    let (mut a, b) = two_with(root.path(), &[]).await;
    let shop = make_token(
        &a.url,
        TOKEN,
        serde_json::json!({ "name": "shop-ci", "scopes": ["functions:deploy:shop-*"] }),
    )
    .await;
    eventually("b accepts the token", || async {
        with_token(
            &b.url,
            &shop,
            Method::GET,
            "/v1/functions/shop-0",
            Vec::new(),
        )
        .await
        .status
            == StatusCode::NOT_FOUND
    })
    .await;

    // 100 changes, alternating hosts and tokens: deploys, policies and a
    // refused one now and then. Each host's own lines must be these, in
    // order.
    let hello = component("hello");
    let mut expected: [Vec<(String, String, u16)>; 2] = [Vec::new(), Vec::new()];
    for i in 0..100 {
        let (node, side) = if i % 2 == 0 { (&a, 0) } else { (&b, 1) };
        let (token, who) = if i % 3 == 0 {
            (TOKEN, "admin")
        } else {
            (shop.as_str(), "shop-ci")
        };
        let function = format!("shop-{}", i % 5);
        let (method, path, body) = match i % 4 {
            0 | 1 => (
                Method::PUT,
                format!("/v1/functions/{function}"),
                distinct(&hello, &format!("audit-{i}")),
            ),
            2 => (
                Method::PUT,
                format!("/v1/functions/{function}/policy"),
                format!("[limits]\ntimeout = \"{}s\"\n", 1 + i % 7).into_bytes(),
            ),
            // Refused: not a policy.
            _ => (
                Method::PUT,
                format!("/v1/functions/{function}/policy"),
                b"[limits]\nmemory = \"a lot\"\n".to_vec(),
            ),
        };
        let answer = with_token(&node.url, token, method.clone(), &path, body).await;
        let status = answer.status.as_u16();
        assert!(
            answer.status.is_success() || i % 4 == 3,
            "{i}: {}",
            answer.text()
        );
        expected[side].push((format!("{method} {path}"), who.to_string(), status));
    }
    for (node, expected) in [(&a, &expected[0]), (&b, &expected[1])] {
        let own = own_entries(node).await;
        // The token creation on a comes first there.
        let own: Vec<(String, String, u16)> = own
            .iter()
            .filter(|e| e["route"] != "POST /v1/tokens")
            .map(|e| {
                (
                    e["route"].as_str().unwrap().to_string(),
                    e["token"].as_str().unwrap().to_string(),
                    e["result"].as_u64().unwrap() as u16,
                )
            })
            .collect();
        assert_eq!(&own, expected, "{}", node.id);
    }
    // A deploy's line names its version and module, and its client.
    let own = own_entries(&a).await;
    let deploy = own
        .iter()
        .find(|e| e["route"] == "PUT /v1/functions/shop-0")
        .unwrap();
    assert!(deploy["version"].is_u64(), "{deploy}");
    assert_eq!(deploy["sha256"].as_str().unwrap().len(), 64, "{deploy}");
    assert_eq!(deploy["client"], "127.0.0.1", "{deploy}");
    assert_eq!(deploy["function"], "shop-0", "{deploy}");
    // The refused ones were made on b (odd changes).
    let on_b = own_entries(&b).await;
    let refused = on_b
        .iter()
        .find(|e| e["result"].as_u64().is_some_and(|s| s >= 400))
        .unwrap_or_else(|| panic!("no refused change in {on_b:?}"));
    assert_eq!(refused["code"], "invalid_policy", "{refused}");

    // b applied a's changes and says so.
    eventually("b records a's deploys as applied from a", || async {
        let log = b
            .admin(Method::GET, "/v1/audit?function=shop-0", Vec::new())
            .await;
        log.json()["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["applied_from_peer"] == "a" && e["route"] == "serve")
    })
    .await;
    // Reading it needs status:read.
    with_token(&a.url, &shop, Method::GET, "/v1/audit", Vec::new())
        .await
        .assert_error(StatusCode::FORBIDDEN, "missing_scope");

    // Acknowledged, then kill -9 at once: the line is there after a restart.
    let last = with_token(
        &a.url,
        TOKEN,
        Method::PUT,
        "/v1/functions/shop-last",
        distinct(&hello, "audit-last"),
    )
    .await;
    assert_eq!(last.status, StatusCode::CREATED, "{}", last.text());
    a.kill();
    let a = Node::launch(root.path(), "a", &a.gossip, &[&b], SECRET, &[]);
    let own = own_entries(&a).await;
    let tail = own.last().unwrap();
    assert_eq!(tail["route"], "PUT /v1/functions/shop-last", "{tail}");
    assert_eq!(tail["version"], last.json()["version"], "{tail}");
}
