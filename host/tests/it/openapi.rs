//! The OpenAPI document (`host/openapi.json`) and the route table
//! (`lichen::api::ROUTES`) describe the same API: every route served is
//! documented with the right methods and security, nothing documented is
//! missing from the table, every error code the README lists appears in
//! the document, and the host serves the document as written.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::collections::BTreeSet;

use common::{host_with, send};
use http::{Method, StatusCode};
use lichen::api::{Access, ROUTES};
use serde_json::{Value, json};

/// Every method an OpenAPI path item can hold; a route for any method
/// (invocation) documents them all.
const METHODS: &[&str] = &[
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

fn document() -> Value {
    serde_json::from_str(lichen::api::observe::OPENAPI).expect("host/openapi.json is JSON")
}

/// The document's form of a route's path: `{path...}` is `{path}`.
fn documented_path(route: &str) -> String {
    route.replace("...}", "}")
}

fn operations(doc: &Value) -> BTreeSet<(String, String)> {
    let mut found = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in METHODS {
            if item.get(*method).is_some() {
                found.insert((path.clone(), method.to_string()));
            }
        }
    }
    found
}

#[test]
fn the_document_lists_exactly_the_routes_the_table_serves() {
    let doc = document();
    assert_eq!(doc["openapi"], "3.1.0");
    let mut served = BTreeSet::new();
    for route in ROUTES {
        let path = documented_path(route.path);
        let methods: Vec<String> = match &route.method {
            Some(method) => vec![method.as_str().to_lowercase()],
            None => METHODS.iter().map(|m| m.to_string()).collect(),
        };
        for method in methods {
            let operation = &doc["paths"][&path][&method];
            assert!(
                operation.is_object(),
                "{} {path} is served but not in host/openapi.json",
                method.to_uppercase()
            );
            let expected = match route.access {
                Access::Public => json!([{}]),
                Access::Admin => json!([{ "adminToken": [] }]),
                Access::Peer => json!([{ "peerSignature": [] }]),
                Access::Function => json!([{}, { "functionToken": [] }]),
                Access::Metrics => json!([{}, { "adminToken": [] }]),
            };
            assert_eq!(
                operation["security"],
                expected,
                "security of {} {path}",
                method.to_uppercase()
            );
            served.insert((path.clone(), method));
        }
    }
    let documented = operations(&doc);
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let unserved: Vec<_> = documented.difference(&served).collect();
    assert!(
        undocumented.is_empty(),
        "served, not documented: {undocumented:?}"
    );
    assert!(unserved.is_empty(), "documented, not served: {unserved:?}");
}

#[test]
fn every_error_code_of_the_readme_is_documented() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    // The rows of the error table: `| 4xx | `code`, `code` | when |`.
    let mut codes = BTreeSet::new();
    for line in readme.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() < 4 || !cells[1].chars().next().is_some_and(|c| c.is_ascii_digit()) {
            continue;
        }
        for code in cells[2].split(['`', ',', '/']).map(str::trim) {
            if !code.is_empty() && code.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                codes.insert(code.to_string());
            }
        }
    }
    assert!(codes.len() > 10, "the README's error table was not found");
    let text = lichen::api::observe::OPENAPI;
    for code in codes {
        assert!(
            text.contains(&format!("\"{code}\"")),
            "the README's error code {code} is not in host/openapi.json"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_serves_the_document_and_every_documented_route() {
    let dir = tempfile::tempdir().unwrap();
    let host = host_with(dir.path(), &[("hello", "hello")]).await;

    // The document needs no token and is the file as written.
    let served = send(
        Method::GET,
        &format!("{}/v1/openapi.json", host.url),
        &[],
        Vec::new(),
    )
    .await;
    assert_eq!(served.status, StatusCode::OK);
    assert_eq!(served.headers["content-type"], "application/json");
    assert_eq!(served.json(), document());

    // Each documented operation reaches a handler: whatever it answers, it
    // is not the router's 404 or 405.
    for (path, method) in operations(&document()) {
        let concrete = path
            .replace("{name}", "hello")
            .replace("{path}", "a/b")
            .replace("{sha256}", &"0".repeat(64));
        let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let reply = host.admin(method.clone(), &concrete, Vec::new()).await;
        let routed = reply.status != StatusCode::METHOD_NOT_ALLOWED
            && !(reply.status == StatusCode::NOT_FOUND && reply.text().contains("no route"));
        assert!(
            routed,
            "{method} {concrete}: {} {}",
            reply.status,
            reply.text()
        );
    }

    // A method a path does not take is 405 with the ones it does.
    let wrong = host.admin(Method::POST, "/v1/functions", Vec::new()).await;
    wrong.assert_error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    assert_eq!(wrong.headers["allow"], "GET");
    let wrong = send(
        Method::DELETE,
        &format!("{}/healthz", host.url),
        &[],
        Vec::new(),
    )
    .await;
    wrong.assert_error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    assert_eq!(wrong.headers["allow"], "GET");
    let many = host
        .admin(Method::POST, "/v1/functions/hello", Vec::new())
        .await;
    assert_eq!(many.headers["allow"], "PUT, GET, DELETE");
    // Under /v1, the admin token comes first: no token, no route map.
    let anonymous = send(
        Method::POST,
        &format!("{}/v1/functions", host.url),
        &[],
        Vec::new(),
    )
    .await;
    anonymous.assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
    let unknown = send(
        Method::GET,
        &format!("{}/v1/nothing", host.url),
        &[],
        Vec::new(),
    )
    .await;
    unknown.assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
    host.stop().await;
}
