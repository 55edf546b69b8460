//! `lichen serve`'s settings from a config file and the environment: what
//! wins over what, secrets from files, and the message each bad file gets.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::path::Path;
use std::process::Command;

use common::{component, send, spawn_lichen_with_env};
use http::{Method, StatusCode};

const LICHEN: &str = env!("CARGO_BIN_EXE_lichen");

/// Deploys `hello` (about 100 KB) to a host started with `args` and `env`:
/// whether it fits is what says which `max_upload_bytes` is in force.
async fn upload_status(data: &Path, args: &[&str], env: &[(&str, &str)]) -> StatusCode {
    let (mut child, url, _log) = spawn_lichen_with_env(data, args, env);
    let token = std::fs::read_to_string(data.join("admin-token")).unwrap();
    let reply = send(
        Method::PUT,
        &format!("{url}/v1/functions/hello"),
        &[("authorization", &format!("Bearer {}", token.trim()))],
        component("hello"),
    )
    .await;
    child.kill().unwrap();
    let _ = child.wait();
    reply.status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flag_wins_over_the_environment_and_the_environment_over_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lichen.toml");
    std::fs::write(&file, "max_upload_bytes = 1000\ndrain = \"0s\"\n").unwrap();
    let config = file.to_str().unwrap();
    let data = |n: &str| dir.path().join(n);
    let small = StatusCode::PAYLOAD_TOO_LARGE;
    // The file alone: too small for hello.
    assert_eq!(
        upload_status(&data("a"), &["--config", config], &[]).await,
        small
    );
    // The environment over the file.
    let roomy = [("LICHEN_MAX_UPLOAD_BYTES", "10000000")];
    let status = upload_status(&data("b"), &["--config", config], &roomy).await;
    assert_eq!(status, StatusCode::CREATED);
    // The flag over the environment.
    let args = ["--config", config, "--max-upload-bytes", "1000"];
    assert_eq!(upload_status(&data("c"), &args, &roomy).await, small);
    // The file named by LICHEN_CONFIG.
    let by_env = [("LICHEN_CONFIG", config)];
    assert_eq!(upload_status(&data("d"), &[], &by_env).await, small);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_come_from_files_named_in_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin-token.secret");
    std::fs::write(&token_file, "a-token-from-a-file\n").unwrap();
    let file = dir.path().join("lichen.toml");
    std::fs::write(
        &file,
        format!(
            "admin_token_file = {:?}\ndrain = \"0s\"\n",
            token_file.to_str().unwrap()
        ),
    )
    .unwrap();
    let data = dir.path().join("data");
    let (mut child, url, _log) =
        spawn_lichen_with_env(&data, &["--config", file.to_str().unwrap()], &[]);
    let list = |token: &'static str| {
        let url = format!("{url}/v1/functions");
        async move {
            send(
                Method::GET,
                &url,
                &[("authorization", &format!("Bearer {token}"))],
                Vec::new(),
            )
            .await
            .status
        }
    };
    assert_eq!(list("a-token-from-a-file").await, StatusCode::OK);
    assert_eq!(list("another-token").await, StatusCode::FORBIDDEN);
    // The token came from the file, so none was generated.
    assert!(!data.join("admin-token").exists());
    child.kill().unwrap();
}

/// `tests/ui/config/*.toml`, each beside the message `lichen serve` must
/// give for it (`*.stderr`). `BLESS=1` rewrites the expected messages.
#[test]
fn invalid_config_files_give_the_expected_messages() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ui/config");
    let data = tempfile::tempdir().unwrap();
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    entries.sort();
    assert!(entries.len() >= 5);
    for path in entries {
        let output = Command::new(LICHEN)
            .args(["serve", "--data-dir"])
            .arg(data.path())
            .arg("--config")
            .arg(&path)
            .env_remove("LICHEN_ADMIN_TOKEN")
            .output()
            .unwrap();
        let file = path.file_name().unwrap().to_str().unwrap();
        assert!(!output.status.success(), "{file} was accepted");
        let actual = String::from_utf8_lossy(&output.stderr).replace(dir.to_str().unwrap(), "$DIR");
        let expected_path = path.with_extension("stderr");
        if std::env::var_os("BLESS").is_some() {
            std::fs::write(&expected_path, &actual).unwrap();
        }
        let expected = std::fs::read_to_string(&expected_path).unwrap_or_else(|_| {
            panic!("{} is missing (run with BLESS=1)", expected_path.display())
        });
        assert_eq!(actual, expected, "{file}");
    }
}
