//! `wasi:config/store` in all three versions components import, through real
//! HTTP against a real host: the fixtures are built with wit-bindgen against
//! the WIT the host vendors, and the rc.1 one also runs under
//! `wasmtime serve -S config` for the reference answer.
#![allow(clippy::unwrap_used)]

use http::{Method, StatusCode};
use serde_json::{Value, json};

use crate::common::{self, TestHost, host_with, send, write_policy};

/// The three fixtures, one per `wasi:config` version.
const VERSIONS: [&str; 3] = ["config-rc1", "config-draft", "config-draft-2024"];

const POLICY: &str = r#"
[config]
greeting = "hello from the policy"
"db.url" = "postgres://db.example.com/app"
empty = ""
"#;

async fn read(host: &TestHost, function: &str, query: &str) -> Value {
    let reply = host.get(&format!("/fn/{function}/?{query}")).await;
    assert_eq!(reply.status, StatusCode::OK, "{function}: {}", reply.text());
    reply.json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_version_reads_the_policys_config_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    for fixture in VERSIONS {
        write_policy(dir.path(), fixture, POLICY);
    }
    let mut functions: Vec<(&str, &str)> = VERSIONS.iter().map(|f| (*f, *f)).collect();
    // The same component without a `[config]`: it is granted nothing.
    functions.push(("bare", "config-rc1"));
    let host = host_with(dir.path(), &functions).await;

    for fixture in VERSIONS {
        let greeting = read(&host, fixture, "key=greeting").await;
        assert_eq!(greeting["value"], "hello from the policy", "{fixture}");
        let url = read(&host, fixture, "key=db.url").await;
        assert_eq!(url["value"], "postgres://db.example.com/app", "{fixture}");
        assert_eq!(read(&host, fixture, "key=empty").await["value"], "");
        let missing = read(&host, fixture, "key=password").await;
        assert_eq!(missing["value"], Value::Null, "{fixture}: {missing}");
        let all = read(&host, fixture, "").await;
        assert_eq!(
            all["all"],
            json!([
                ["db.url", "postgres://db.example.com/app"],
                ["empty", ""],
                ["greeting", "hello from the policy"]
            ]),
            "{fixture}"
        );
    }
    assert_eq!(
        read(&host, "bare", "key=greeting").await["value"],
        Value::Null
    );
    assert_eq!(read(&host, "bare", "").await["all"], json!([]));
    host.stop().await;
}

/// The rc.1 fixture answers here as under `wasmtime serve -S config` given
/// the same variables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rc1_fixture_answers_as_under_wasmtime_serve() {
    let dir = tempfile::tempdir().unwrap();
    write_policy(dir.path(), "config", POLICY);
    let host = host_with(dir.path(), &[("config", "config-rc1")]).await;

    let path = dir.path().join("config_rc1.wasm");
    std::fs::write(&path, common::component("config-rc1")).unwrap();
    let wasmtime = common::WasmtimeServe::start(
        &path,
        &[
            "-S",
            "config",
            "-S",
            "config-var=greeting=hello from the policy",
            "-S",
            "config-var=db.url=postgres://db.example.com/app",
            "-S",
            "config-var=empty=",
        ],
    );
    for query in [
        "key=greeting",
        "key=db.url",
        "key=empty",
        "key=password",
        "",
    ] {
        let theirs = send(
            Method::GET,
            &format!("{}/?{query}", wasmtime.url),
            &[],
            Vec::new(),
        )
        .await;
        assert_eq!(theirs.status, StatusCode::OK, "{query}: {}", theirs.text());
        assert_eq!(theirs.json(), read(&host, "config", query).await, "{query}");
    }
    host.stop().await;
}
