//! The authorization matrix: every admin and internal route against every
//! kind of credential (none, a wrong one, an expired and a revoked token,
//! a token of each scope with a pattern that matches and one that does not,
//! and the admin token), on one real host. The expected cell comes from the
//! table below, written by hand as the README states who may do what, not
//! from the code that decides it; a route with no row fails the test.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use http::{Method, StatusCode};
use lichen_core::routes::{Access, ROUTES};

use crate::common::{self, Reply, TestHost, send, test_config, with_token};

/// The scoped tokens of the matrix: a name, and its scopes. Patterns match
/// `m-*` (the names the rows use) or `x-*` (which they do not).
const KINDS: &[(&str, &[&str])] = &[
    ("read", &["functions:read"]),
    ("deploy", &["functions:deploy:m-*"]),
    ("deploy-other", &["functions:deploy:x-*"]),
    ("delete", &["functions:delete:m-*"]),
    ("delete-other", &["functions:delete:x-*"]),
    ("status", &["status:read"]),
    ("tokens", &["tokens:admin"]),
    ("secrets", &["secrets:m-*"]),
    ("secrets-other", &["secrets:x-*"]),
    // Scopes for what policies grant: no route is theirs.
    (
        "grants",
        &[
            "hosts:*",
            "files:*",
            "outbound:*",
            "tcp:0.0.0.0/0",
            "streams:*",
        ],
    ),
];

/// A row: the route's pattern (as `lichen_core::routes` has it), the
/// request made, and the kinds of scoped token it lets in (the admin token
/// always, for admin routes; nobody's token, for internal ones).
struct Row {
    pattern: &'static str,
    method: Method,
    path: &'static str,
    allowed: &'static [&'static str],
}

const fn row(
    pattern: &'static str,
    method: Method,
    path: &'static str,
    allowed: &'static [&'static str],
) -> Row {
    Row {
        pattern,
        method,
        path,
        allowed,
    }
}

fn rows() -> Vec<Row> {
    vec![
        row("/v1/functions", Method::GET, "/v1/functions", &["read"]),
        row("/v1/routes", Method::GET, "/v1/routes", &["read"]),
        row(
            "/v1/functions/{name}",
            Method::PUT,
            "/v1/functions/m-fn",
            &["deploy"],
        ),
        row(
            "/v1/functions/{name}",
            Method::GET,
            "/v1/functions/m-fn",
            &["read", "deploy"],
        ),
        row(
            "/v1/functions/{name}",
            Method::DELETE,
            "/v1/functions/m-fn",
            &["delete"],
        ),
        row(
            "/v1/functions/{name}/policy",
            Method::GET,
            "/v1/functions/m-fn/policy",
            &["read", "deploy"],
        ),
        row(
            "/v1/functions/{name}/policy",
            Method::PUT,
            "/v1/functions/m-fn/policy",
            &["deploy"],
        ),
        row(
            "/v1/functions/{name}/kv",
            Method::GET,
            "/v1/functions/m-fn/kv",
            &["read", "deploy"],
        ),
        row(
            "/v1/functions/{name}/kv/{label}",
            Method::DELETE,
            "/v1/functions/m-fn/kv/default",
            &["deploy"],
        ),
        row(
            "/v1/functions/{name}/rollback",
            Method::POST,
            "/v1/functions/m-fn/rollback",
            &["deploy"],
        ),
        row(
            "/v1/functions/{name}/triggers/{index}/run",
            Method::POST,
            "/v1/functions/m-fn/triggers/0/run",
            &["deploy"],
        ),
        row(
            "/v1/secrets",
            Method::GET,
            "/v1/secrets",
            &["secrets", "secrets-other"],
        ),
        row(
            "/v1/secrets/{name}",
            Method::PUT,
            "/v1/secrets/m-s",
            &["secrets"],
        ),
        row(
            "/v1/secrets/{name}",
            Method::DELETE,
            "/v1/secrets/m-s",
            &["secrets"],
        ),
        row("/v1/tokens", Method::POST, "/v1/tokens", &["tokens"]),
        row("/v1/tokens", Method::GET, "/v1/tokens", &["tokens"]),
        row(
            "/v1/tokens/{name}",
            Method::DELETE,
            "/v1/tokens/nobody",
            &["tokens"],
        ),
        row("/v1/peers", Method::GET, "/v1/peers", &["status"]),
        row("/v1/status", Method::GET, "/v1/status", &["status"]),
        row("/v1/audit", Method::GET, "/v1/audit", &["status"]),
        row("/metrics", Method::GET, "/metrics", &["status"]),
        // Internal routes: a peer's signature, never a token.
        row(
            "/v1/internal/modules/{sha256}",
            Method::GET,
            "/v1/internal/modules/0000000000000000000000000000000000000000000000000000000000000000",
            &[],
        ),
        row(
            "/v1/internal/cron-claims",
            Method::POST,
            "/v1/internal/cron-claims",
            &[],
        ),
    ]
}

async fn token(host: &TestHost, name: &str, scopes: &[&str], expires_in: Option<&str>) -> String {
    let mut body = serde_json::json!({ "name": name, "scopes": scopes });
    if let Some(expires_in) = expires_in {
        body["expires_in"] = serde_json::json!(expires_in);
    }
    common::make_token(&host.url, &host.token, body).await
}

async fn call(host: &TestHost, row: &Row, bearer: Option<&str>) -> Reply {
    match bearer {
        Some(token) => with_token(&host.url, token, row.method.clone(), row.path, Vec::new()).await,
        None => {
            send(
                row.method.clone(),
                &format!("{}{}", host.url, row.path),
                &[],
                Vec::new(),
            )
            .await
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_answers_every_credential_as_the_table_says() {
    let rows = rows();
    // Every admin and internal route has a row (and /metrics, which needs
    // a token on this host).
    for route in ROUTES {
        if matches!(route.access, Access::Admin | Access::Peer | Access::Metrics) {
            let method = route.method.clone().unwrap();
            assert!(
                rows.iter()
                    .any(|r| r.pattern == route.path && r.method == method),
                "{method} {} has no row in the matrix",
                route.path
            );
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(&dir.path().join("data"));
    config.metrics_require_token = true;
    let host = TestHost::start(config).await;
    let mut tokens = Vec::new();
    for (kind, scopes) in KINDS {
        tokens.push((*kind, token(&host, kind, scopes, None).await));
    }
    let every: Vec<&str> = KINDS.iter().flat_map(|(_, s)| s.iter().copied()).collect();
    let expired = token(&host, "expired", &every, Some("1s")).await;
    let revoked = token(&host, "revoked", &every, None).await;
    let gone = host
        .admin(Method::DELETE, "/v1/tokens/revoked", Vec::new())
        .await;
    assert_eq!(gone.status, StatusCode::OK, "{}", gone.text());
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let mut cells = 0;
    let mut wrong_cells = Vec::new();
    for row in &rows {
        let internal = row.path.starts_with("/v1/internal/");
        let mut check = |who: &str, reply: Reply, expected: &dyn Fn(&Reply) -> bool| {
            cells += 1;
            if !expected(&reply) {
                wrong_cells.push(format!(
                    "{} {} as {who}: {} {}",
                    row.method,
                    row.path,
                    reply.status,
                    reply.text()
                ));
            }
        };
        let refused = |reply: &Reply| {
            reply.status == StatusCode::UNAUTHORIZED || reply.status == StatusCode::FORBIDDEN
        };
        let status_code = |status: StatusCode, code: &'static str| {
            move |reply: &Reply| reply.status == status && (internal || reply.code() == code)
        };
        let let_in = |reply: &Reply| !refused(reply);
        check(
            "no credential",
            call(&host, row, None).await,
            &|r: &Reply| {
                if internal {
                    refused(r)
                } else {
                    status_code(StatusCode::UNAUTHORIZED, "unauthorized")(r)
                }
            },
        );
        check(
            "a wrong token",
            call(&host, row, Some("guess")).await,
            &|r: &Reply| {
                if internal {
                    refused(r)
                } else {
                    status_code(StatusCode::FORBIDDEN, "forbidden")(r)
                }
            },
        );
        check(
            "an expired token",
            call(&host, row, Some(&expired)).await,
            &|r: &Reply| {
                if internal {
                    refused(r)
                } else {
                    status_code(StatusCode::UNAUTHORIZED, "token_expired")(r)
                }
            },
        );
        check(
            "a revoked token",
            call(&host, row, Some(&revoked)).await,
            &|r: &Reply| {
                if internal {
                    refused(r)
                } else {
                    status_code(StatusCode::UNAUTHORIZED, "token_revoked")(r)
                }
            },
        );
        for (kind, token) in &tokens {
            let reply = call(&host, row, Some(token)).await;
            if row.allowed.contains(kind) {
                check(kind, reply, &let_in);
            } else if internal {
                check(kind, reply, &refused);
            } else {
                check(
                    kind,
                    reply,
                    &status_code(StatusCode::FORBIDDEN, "missing_scope"),
                );
            }
        }
        let admin = call(&host, row, Some(&host.token)).await;
        if internal {
            check("the admin token", admin, &refused);
        } else {
            check("the admin token", admin, &let_in);
        }
    }
    assert!(
        wrong_cells.is_empty(),
        "{} of {cells} cells differ from the table:\n{}",
        wrong_cells.len(),
        wrong_cells.join("\n")
    );
    assert_eq!(cells, rows.len() * (4 + KINDS.len() + 1));
    host.stop().await;
}
