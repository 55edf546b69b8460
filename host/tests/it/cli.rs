//! The real `lichen` binary: `serve` on port 0 (address read from its log),
//! the client subcommands against it, the generated admin token, and a clean
//! exit on SIGTERM.

#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

use crate::common;

use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command};

use common::{Spawned, component, send};
use http::{Method, StatusCode};

const LICHEN: &str = env!("CARGO_BIN_EXE_lichen");

/// Starts `lichen serve` and returns it with the URL from its log line.
fn serve(data_dir: &std::path::Path) -> (Spawned, String, std::thread::JoinHandle<Vec<String>>) {
    serve_with(data_dir, &[])
}

fn serve_with(
    data_dir: &std::path::Path,
    extra: &[&str],
) -> (Spawned, String, std::thread::JoinHandle<Vec<String>>) {
    common::spawn_lichen(data_dir, extra)
}

fn run_client(args: &[&str], url: &str, data_dir: &std::path::Path) -> (bool, String, String) {
    let output = Command::new(LICHEN)
        .args(args)
        .args(["--url", url, "--data-dir"])
        .arg(data_dir)
        .env_remove("LICHEN_ADMIN_TOKEN")
        .output()
        .expect("running the lichen client");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_deploy_invoke_list_remove_and_stop() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let wasm = dir.path().join("hello.wasm");
    std::fs::write(&wasm, component("hello")).unwrap();
    let (mut child, url, log) = serve(&data_dir);

    // The generated token is kept private to the owner.
    let token_file = data_dir.join("admin-token");
    let mode = std::fs::metadata(&token_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    let (ok, out, err) = run_client(
        &["deploy", "greet", wasm.to_str().unwrap()],
        &url,
        &data_dir,
    );
    assert!(ok, "{err}");
    assert!(out.contains("deployed greet version "), "{out}");
    let v1 = version_in(&out);

    let reply = send(Method::GET, &format!("{url}/fn/greet"), &[], Vec::new()).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.text(), "Hello from Lichen!\n");
    let greet_id = reply.headers["x-lichen-request-id"]
        .to_str()
        .unwrap()
        .to_string();

    let (ok, out, _) = run_client(&["ls"], &url, &data_dir);
    assert!(ok);
    assert!(out.lines().any(|l| l.starts_with("greet ")), "{out}");

    // A second version, rolled back by the CLI, then forward by number.
    let echo_wasm = dir.path().join("echo.wasm");
    std::fs::write(&echo_wasm, component("echo")).unwrap();
    let (ok, out, err) = run_client(
        &["deploy", "greet", echo_wasm.to_str().unwrap()],
        &url,
        &data_dir,
    );
    assert!(ok && out.contains("version "), "{out}{err}");
    let v2 = version_in(&out);
    assert_ne!(v1, v2);
    let (ok, out, err) = run_client(&["rollback", "greet"], &url, &data_dir);
    assert!(ok, "{err}");
    assert!(out.contains(&format!("greet is at version {v1}")), "{out}");
    let reply = send(Method::GET, &format!("{url}/fn/greet"), &[], Vec::new()).await;
    assert_eq!(reply.text(), "Hello from Lichen!\n");
    let (ok, out, err) = run_client(&["rollback", "greet", &v2], &url, &data_dir);
    assert!(
        ok && out.contains(&format!("greet is at version {v2}")),
        "{out}{err}"
    );
    let (ok, _, err) = run_client(&["rollback", "greet", &v1], &url, &data_dir);
    assert!(ok, "{err}");

    // Errors print the server's message.
    let (ok, _, err) = run_client(
        &["deploy", "Bad_Name", wasm.to_str().unwrap()],
        &url,
        &data_dir,
    );
    assert!(!ok);
    assert!(
        err.contains("400") && err.contains("invalid function name"),
        "{err}"
    );
    let output = Command::new(LICHEN)
        .args(["ls", "--url", &url, "--token", "wrong"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("403"));

    // Guest output reaches the host log, tagged with function and request id.
    let trap_wasm = dir.path().join("trap.wasm");
    std::fs::write(&trap_wasm, component("trap")).unwrap();
    let (ok, _, err) = run_client(
        &["deploy", "chatty", trap_wasm.to_str().unwrap()],
        &url,
        &data_dir,
    );
    assert!(ok, "{err}");
    let logged = send(
        Method::GET,
        &format!("{url}/fn/chatty/log"),
        &[],
        Vec::new(),
    )
    .await;
    assert_eq!(logged.text(), "logged\n");
    let request_id = logged.headers["x-lichen-request-id"]
        .to_str()
        .unwrap()
        .to_string();

    let (ok, out, err) = run_client(&["rm", "greet"], &url, &data_dir);
    assert!(ok, "{err}");
    assert!(out.contains("removed greet"));
    let gone = send(Method::GET, &format!("{url}/fn/greet"), &[], Vec::new()).await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND);
    let (ok, out, err) = run_client(&["rm", "chatty", "--purge-kv"], &url, &data_dir);
    assert!(ok, "{err}");
    assert!(
        out.contains("removed chatty and its key-value data"),
        "{out}"
    );

    stop(&mut child);
    let lines = log.join().unwrap();
    assert!(lines.iter().any(|l| l.contains("SIGTERM")), "{lines:?}");
    // One line per invocation, carrying the id the client got.
    let invocation: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains(&format!("request_id=\"{greet_id}\"")))
        .collect();
    assert_eq!(invocation.len(), 1, "{lines:#?}");
    for field in [
        "invocation",
        "function=greet",
        "method=GET",
        "status=200",
        "outcome=\"ok\"",
        "duration_us=",
    ] {
        assert!(
            invocation[0].contains(field),
            "{field} missing in {}",
            invocation[0]
        );
    }
    for (stream, text) in [
        ("stdout", "a line on stdout"),
        ("stderr", "a line on stderr"),
    ] {
        assert!(
            lines.iter().any(|l| l.contains(text)
                && l.contains("function=\"chatty\"")
                && l.contains(&format!("request_id=\"{request_id}\""))
                && l.contains(&format!("stream=\"{stream}\""))),
            "no {stream} line for {request_id} in {lines:#?}"
        );
    }
}

/// A request in flight when SIGTERM arrives still gets its answer, and the
/// host then exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_requests_finish() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    common::write_policy(&data_dir, "fib", "[limits]\ntimeout = \"5m\"\n");
    let (mut child, url, _log) = serve(&data_dir);
    let token = std::fs::read_to_string(data_dir.join("admin-token")).unwrap();
    let auth = format!("Bearer {}", token.trim());
    let deployed = send(
        Method::PUT,
        &format!("{url}/v1/functions/fib"),
        &[("authorization", &auth)],
        component("fib"),
    )
    .await;
    assert_eq!(deployed.status, StatusCode::CREATED);

    // fib(40) runs for about a second in wasm: SIGTERM comes while it
    // runs, however long it takes here.
    let slow_url = format!("{url}/fn/fib?n=40");
    let slow = tokio::spawn(async move { send(Method::GET, &slow_url, &[], Vec::new()).await });
    common::until_in_flight(&url, "fib", 1.0).await;
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let reply = slow.await.unwrap();
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["fib"], 102334155);
    stop(&mut child);
}

fn stop(child: &mut Child) {
    let status = common::stop_gracefully(child);
    assert!(
        status.success(),
        "the host exits 0 on SIGTERM, got {status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_request_id() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let (mut child, url, log) = serve_with(&data_dir, &["--log-format", "json"]);
    let token = std::fs::read_to_string(data_dir.join("admin-token")).unwrap();
    let auth = format!("Bearer {}", token.trim());
    let deployed = send(
        Method::PUT,
        &format!("{url}/v1/functions/hello"),
        &[("authorization", &auth)],
        component("hello"),
    )
    .await;
    assert_eq!(deployed.status, StatusCode::CREATED);
    let reply = send(Method::GET, &format!("{url}/fn/hello"), &[], Vec::new()).await;
    let id = reply.headers["x-lichen-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    stop(&mut child);
    let lines = log.join().unwrap();
    let records: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let invocation = records
        .iter()
        .find(|r| r["fields"]["request_id"] == id.as_str())
        .unwrap_or_else(|| panic!("no record for {id}: {records:#?}"));
    assert_eq!(invocation["fields"]["message"], "invocation");
    assert_eq!(invocation["fields"]["status"], 200);
    assert_eq!(invocation["fields"]["function"], "hello");
}

/// The version id a CLI line names (`... version N ...`).
fn version_in(out: &str) -> String {
    let after = out
        .split("version ")
        .nth(1)
        .unwrap_or_else(|| panic!("no version in {out:?}"));
    after.chars().take_while(char::is_ascii_digit).collect()
}

/// The audit log is a chain `lichen audit verify` walks: after changes,
/// refusals of a wrong token and of none (recorded as `unknown` and
/// `none`) and a policy file edited on disk (as `policy-file`), it holds;
/// a line changed in the file breaks it, named, with a failed exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_log_is_a_chain_the_cli_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (_host, url, _log) = serve(&data);
    let token = std::fs::read_to_string(data.join("admin-token")).unwrap();
    let token = token.trim();
    let bearer = format!("Bearer {token}");
    let deploy = format!("{url}/v1/functions/hello");
    let made = send(
        Method::PUT,
        &deploy,
        &[("authorization", &bearer)],
        component("hello"),
    )
    .await;
    assert_eq!(made.status, StatusCode::CREATED, "{}", made.text());
    let wrong = send(
        Method::PUT,
        &deploy,
        &[("authorization", "Bearer guess")],
        Vec::new(),
    )
    .await;
    assert_eq!(wrong.status, StatusCode::FORBIDDEN, "{}", wrong.text());
    let none = send(Method::DELETE, &deploy, &[], Vec::new()).await;
    assert_eq!(none.status, StatusCode::UNAUTHORIZED, "{}", none.text());
    std::fs::write(data.join("policies/hello.toml"), "[limits]\nqueue = 3\n").unwrap();
    let audit = format!("{url}/v1/audit");
    common::eventually("the edit on disk is in the log", || async {
        let log = send(
            Method::GET,
            &audit,
            &[("authorization", &bearer)],
            Vec::new(),
        )
        .await;
        log.text().contains("\"policy-file\"")
    })
    .await;
    // Removing the file (the function turns public) is an edit too.
    std::fs::remove_file(data.join("policies/hello.toml")).unwrap();
    common::eventually("the removal is in the log", || async {
        let log = send(
            Method::GET,
            &audit,
            &[("authorization", &bearer)],
            Vec::new(),
        )
        .await;
        log.text().matches("\"policy-file\"").count() == 2
    })
    .await;
    let log = send(
        Method::GET,
        &audit,
        &[("authorization", &bearer)],
        Vec::new(),
    )
    .await
    .json();
    let tokens: Vec<&str> = log["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["token"].as_str())
        .collect();
    for expected in ["admin", "unknown", "none", "policy-file"] {
        assert!(tokens.contains(&expected), "{expected}: {log}");
    }
    let verify = |data: &std::path::Path| {
        Command::new(LICHEN)
            .args(["audit", "verify", "--data-dir"])
            .arg(data)
            .output()
            .unwrap()
    };
    let held = verify(&data);
    assert!(
        held.status.success(),
        "{}",
        String::from_utf8_lossy(&held.stderr)
    );
    assert!(
        String::from_utf8_lossy(&held.stdout).contains("holds: 5 lines"),
        "{}",
        String::from_utf8_lossy(&held.stdout)
    );
    // Someone rewrites the first change as a refusal.
    let path = data.join("audit.log");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replacen("\"result\":201", "\"result\":403", 1)).unwrap();
    let broken = verify(&data);
    assert!(!broken.status.success());
    let said = String::from_utf8_lossy(&broken.stderr);
    assert!(
        said.contains("audit.log:2") && said.contains("chain breaks"),
        "{said}"
    );
}
