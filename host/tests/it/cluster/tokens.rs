//! Scoped API tokens across two hosts: a token made on one is accepted by
//! the other, and a revoked or expired one is refused by both.

use http::{Method, StatusCode};

use super::{Node, TOKEN, two_with};
use crate::common::{component, eventually, make_token, with_token};

async fn make(node: &Node, request: serde_json::Value) -> String {
    make_token(&node.url, TOKEN, request).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_made_on_one_host_is_accepted_and_revoked_on_every_host() {
    let root = tempfile::tempdir().unwrap();
    let (a, b) = two_with(root.path(), &[]).await;

    let shop = make(
        &a,
        serde_json::json!({ "name": "shop-ci", "scopes": ["functions:deploy:shop-*"] }),
    )
    .await;
    // b takes it from gossip: it deploys shop-cart there.
    eventually("b accepts the token", || async {
        with_token(
            &b.url,
            &shop,
            Method::GET,
            "/v1/functions/shop-cart",
            Vec::new(),
        )
        .await
        .status
            == StatusCode::NOT_FOUND
    })
    .await;
    let deployed = with_token(
        &b.url,
        &shop,
        Method::PUT,
        "/v1/functions/shop-cart",
        component("hello"),
    )
    .await;
    assert_eq!(deployed.status, StatusCode::CREATED, "{}", deployed.text());
    with_token(
        &b.url,
        &shop,
        Method::DELETE,
        "/v1/functions/shop-cart",
        Vec::new(),
    )
    .await
    .assert_error(StatusCode::FORBIDDEN, "missing_scope");

    // Revoked on b: refused on a too.
    let revoked = with_token(
        &b.url,
        TOKEN,
        Method::DELETE,
        "/v1/tokens/shop-ci",
        Vec::new(),
    )
    .await;
    assert_eq!(revoked.status, StatusCode::OK, "{}", revoked.text());
    for node in [&a, &b] {
        eventually(
            &format!("{} refuses the revoked token", node.id),
            || async {
                with_token(
                    &node.url,
                    &shop,
                    Method::GET,
                    "/v1/functions/shop-cart",
                    Vec::new(),
                )
                .await
                .code()
                    == "token_revoked"
            },
        )
        .await;
    }
    // Made again under the same name: a new token; the old one stays out.
    let again = make(
        &b,
        serde_json::json!({ "name": "shop-ci", "scopes": ["functions:read"], "expires_in": "3s" }),
    )
    .await;
    eventually("a accepts the new token", || async {
        with_token(&a.url, &again, Method::GET, "/v1/functions", Vec::new())
            .await
            .status
            == StatusCode::OK
    })
    .await;
    with_token(&a.url, &shop, Method::GET, "/v1/functions", Vec::new())
        .await
        .assert_error(StatusCode::FORBIDDEN, "forbidden");
    // It expires everywhere, by each host's clock.
    for node in [&a, &b] {
        eventually(
            &format!("{} refuses the expired token", node.id),
            || async {
                with_token(&node.url, &again, Method::GET, "/v1/functions", Vec::new())
                    .await
                    .code()
                    == "token_expired"
            },
        )
        .await;
    }
}
