//! Secrets through the admin API and the CLI, read by a real component
//! through `wasi:config`, against the real `lichen` binary: a value goes in
//! and reaches the guest, and appears nowhere else (disk, log at debug
//! level, answers, metrics).
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use http::{Method, StatusCode};

use crate::common::{self, Reply, TestHost, host_with, send, write_policy};

const POLICY: &str = r#"
[config]
db_password = { secret = "pg" }
user = "app"
"#;

/// Values no other part of the test, the fixture or the host writes.
const FIRST: &str = "first-9c41d7e2-plain-value";
const ROTATED: &str = "rotated-5b08f3aa-plain-value";

async fn admin(url: &str, token: &str, method: Method, path: &str, body: &[u8]) -> Reply {
    let auth = format!("Bearer {token}");
    send(
        method,
        &format!("{url}{path}"),
        &[("authorization", &auth)],
        body.to_vec(),
    )
    .await
}

async fn password(url: &str) -> Reply {
    send(
        Method::GET,
        &format!("{url}/fn/cfg/?key=db_password"),
        &[],
        Vec::new(),
    )
    .await
}

/// Every file under `dir` that holds `needle`.
fn files_holding(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    for entry in common::files_under(dir) {
        let bytes = std::fs::read(&entry).unwrap_or_default();
        if bytes.windows(needle.len()).any(|window| window == needle) {
            found.push(entry.display().to_string());
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_reaches_the_guest_and_shows_nowhere_else() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_policy(&data, "cfg", POLICY);
    let debug = [("RUST_LOG", "debug")];
    let (mut child, url, log) = common::spawn_lichen_with_env(&data, &[], &debug);
    let token = std::fs::read_to_string(data.join("admin-token")).unwrap();
    let token = token.trim();
    let deployed = admin(
        &url,
        token,
        Method::PUT,
        "/v1/functions/cfg",
        &common::component("config-rc1"),
    )
    .await;
    assert_eq!(deployed.status, StatusCode::CREATED, "{}", deployed.text());

    // The policy names a secret that is not set: it is not in force, and
    // says why.
    let early = password(&url).await;
    assert_eq!(
        early.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        early.text()
    );
    let policy = admin(&url, token, Method::GET, "/v1/functions/cfg/policy", b"").await;
    let error = policy.json()["error"].to_string();
    assert!(error.contains("\\\"pg\\\", which is not set"), "{error}");

    // Set, over the CLI (the value on standard input): the policy comes
    // into force and the guest reads the value.
    let set = cli_set(&url, token, "pg", FIRST);
    assert!(set.contains("set secret pg"), "{set}");
    let first = password(&url).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text());
    assert_eq!(first.json()["value"], FIRST);

    // Replaced over the API: the next invocation sees it, no redeploy.
    let replaced = admin(
        &url,
        token,
        Method::PUT,
        "/v1/secrets/pg",
        ROTATED.as_bytes(),
    )
    .await;
    assert_eq!(replaced.status, StatusCode::OK, "{}", replaced.text());
    assert_eq!(password(&url).await.json()["value"], ROTATED);
    let all = send(Method::GET, &format!("{url}/fn/cfg/"), &[], Vec::new()).await;
    assert_eq!(
        all.json()["all"],
        serde_json::json!([["db_password", ROTATED], ["user", "app"]])
    );

    // In use: it cannot be removed from under the function.
    let removed = admin(&url, token, Method::DELETE, "/v1/secrets/pg", b"").await;
    assert_eq!(removed.status, StatusCode::CONFLICT, "{}", removed.text());
    assert!(removed.text().contains("cfg"), "{}", removed.text());

    // Nowhere else: not in any answer about it...
    let mut answers = Vec::new();
    for path in [
        "/v1/secrets",
        "/v1/functions/cfg/policy",
        "/v1/functions/cfg",
        "/v1/status",
        "/metrics",
    ] {
        let reply = admin(&url, token, Method::GET, path, b"").await;
        assert_eq!(reply.status, StatusCode::OK, "{path}: {}", reply.text());
        answers.push(reply.text());
    }
    let listed = admin(&url, token, Method::GET, "/v1/secrets", b"")
        .await
        .json();
    assert_eq!(listed["secrets"][0]["name"], "pg");
    assert_eq!(listed["secrets"][0]["digest"].as_str().unwrap().len(), 64);
    answers.push(replaced.text());
    let cli_list = cli(&url, token, &["secret", "ls"], "");
    assert!(cli_list.contains("pg"), "{cli_list}");
    answers.push(cli_list);

    // ...on disk, or in the log at debug level.
    child.kill().unwrap();
    child.wait().unwrap();
    let log = log.join().unwrap().join("\n");
    assert!(log.contains("DEBUG"), "the host did not log at debug level");
    for value in [FIRST, ROTATED] {
        for answer in &answers {
            assert!(
                !answer.contains(value),
                "an answer shows the value: {answer}"
            );
        }
        assert!(!log.contains(value), "the log shows the value");
        assert_eq!(files_holding(&data, value.as_bytes()), Vec::<String>::new());
    }
    let key_mode = std::fs::metadata(data.join("secrets.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600);

    // A restart opens it again with the kept key.
    let (_child, url, _log) = common::spawn_lichen(&data, &[]);
    assert_eq!(password(&url).await.json()["value"], ROTATED);
}

/// Runs the CLI against `url`; its standard output (it must succeed).
fn cli(url: &str, token: &str, args: &[&str], stdin: &str) -> String {
    let out = common::run_with_input(
        std::process::Command::new(env!("CARGO_BIN_EXE_lichen"))
            .args(args)
            .args(["--url", url])
            .env("LICHEN_ADMIN_TOKEN", token),
        stdin.as_bytes(),
    );
    assert!(
        out.status.success(),
        "lichen {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn cli_set(url: &str, token: &str, name: &str, value: &str) -> String {
    cli(url, token, &["secret", "set", name], &format!("{value}\n"))
}

/// What the API answers to bad secrets and bad references: the right
/// status, JSON naming the problem, and nothing stored changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_secret_requests_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let host: TestHost = host_with(dir.path(), &[("cfg", "config-rc1")]).await;
    let put = |name: &str, body: &[u8]| {
        let path = format!("/v1/secrets/{name}");
        let body = body.to_vec();
        let host = &host;
        async move { host.admin(Method::PUT, &path, body).await }
    };
    let cases = [
        (
            put("bad.name", b"x").await,
            StatusCode::BAD_REQUEST,
            "invalid_name",
        ),
        (
            put("pg", &[0xff, 0xfe]).await,
            StatusCode::BAD_REQUEST,
            "invalid_secret",
        ),
        (
            put("pg", b"").await,
            StatusCode::BAD_REQUEST,
            "invalid_secret",
        ),
        (
            put("pg", &vec![b'x'; (32 << 10) + 1]).await,
            StatusCode::PAYLOAD_TOO_LARGE,
            "",
        ),
        (
            host.admin(Method::DELETE, "/v1/secrets/none", Vec::new())
                .await,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
    ];
    for (reply, status, code) in cases {
        assert_eq!(reply.status, status, "{}", reply.text());
        assert!(reply.json()["error"].is_string(), "{}", reply.text());
        assert!(reply.text().contains(code), "{}", reply.text());
    }
    let listed = host.admin(Method::GET, "/v1/secrets", Vec::new()).await;
    assert_eq!(listed.json()["secrets"], serde_json::json!([]));

    // A policy naming a secret that is not set is refused; the one in
    // force stays.
    let refused = host
        .admin(Method::PUT, "/v1/functions/cfg/policy", POLICY.into())
        .await;
    assert_eq!(
        refused.status,
        StatusCode::BAD_REQUEST,
        "{}",
        refused.text()
    );
    assert!(refused.text().contains("not set"), "{}", refused.text());
    let reply = host.get("/fn/cfg/").await;
    assert_eq!(reply.json()["all"], serde_json::json!([]));

    // Set, it is accepted; an unused secret can be removed.
    assert_eq!(put("pg", b"v").await.status, StatusCode::CREATED);
    assert_eq!(put("spare", b"w").await.status, StatusCode::CREATED);
    let largest = put("spare", &vec![b'x'; 32 << 10]).await;
    assert_eq!(largest.status, StatusCode::OK, "{}", largest.text());
    let accepted = host
        .admin(Method::PUT, "/v1/functions/cfg/policy", POLICY.into())
        .await;
    assert_eq!(accepted.status, StatusCode::OK, "{}", accepted.text());
    let removed = host
        .admin(Method::DELETE, "/v1/secrets/spare", Vec::new())
        .await;
    assert_eq!(removed.status, StatusCode::OK, "{}", removed.text());
    let reply = host.get("/fn/cfg/?key=db_password").await;
    assert_eq!(reply.json()["value"], "v");
    host.stop().await;
}

/// The `motd` example under its own policy (`policies/motd.toml`): its
/// message for the key the secret holds, `401` otherwise, and the key is
/// never in an answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_motd_example_answers_only_with_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let policy = std::fs::read_to_string(common::repo_root().join("policies/motd.toml")).unwrap();
    write_policy(dir.path(), "motd", &policy);
    let host = host_with(dir.path(), &[("motd", "motd")]).await;
    let key = "0b1e2c3d4f5a6978";
    let set = host
        .admin(Method::PUT, "/v1/secrets/motd-api-key", key.into())
        .await;
    assert_eq!(set.status, StatusCode::CREATED, "{}", set.text());

    let url = format!("{}/fn/motd", host.url);
    let without = send(Method::GET, &url, &[], Vec::new()).await;
    assert_eq!(
        without.status,
        StatusCode::UNAUTHORIZED,
        "{}",
        without.text()
    );
    let wrong = send(
        Method::GET,
        &url,
        &[("x-api-key", "0b1e2c3d4f5a6979")],
        Vec::new(),
    )
    .await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED, "{}", wrong.text());
    let right = send(Method::GET, &url, &[("x-api-key", key)], Vec::new()).await;
    assert_eq!(right.status, StatusCode::OK, "{}", right.text());
    assert_eq!(right.json()["message"], "Lichen grows on bare rock.");
    for reply in [&without, &wrong, &right] {
        assert!(!reply.text().contains(key), "{}", reply.text());
    }
    host.stop().await;
}
