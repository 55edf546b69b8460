//! The status page (`GET /ui`): its headers, `--ui false`, and the page
//! itself in a real browser (Debian's Chromium driven by Playwright, the
//! script `host/tests/browser/status-page.mjs`) against two real
//! `lichen serve` processes in one cluster.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{TestHost, component, repo_root, send, spawn_lichen_with_env, test_config};
use http::{Method, StatusCode};

const TOKEN: &str = "status-page-test-token";
const SECRET: &str = "a-status-page-test-cluster-secret";
/// The browser script's whole run, at most.
const BROWSER_RUN: Duration = Duration::from_secs(180);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_is_served_with_a_strict_content_security_policy() {
    let dir = tempfile::tempdir().unwrap();
    let host = TestHost::start(test_config(dir.path())).await;
    for (path, content_type) in [
        ("/ui", "text/html; charset=utf-8"),
        ("/ui/", "text/html; charset=utf-8"),
        ("/ui/app.js", "text/javascript; charset=utf-8"),
        ("/ui/app.css", "text/css; charset=utf-8"),
        ("/ui/icon.svg", "image/svg+xml"),
    ] {
        // No token: the page holds no data, the API it reads does.
        let reply = send(Method::GET, &format!("{}{path}", host.url), &[], Vec::new()).await;
        assert_eq!(reply.status, StatusCode::OK, "{path}");
        let header = |name: &str| {
            reply
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string()
        };
        assert_eq!(header("content-type"), content_type, "{path}");
        let csp = header("content-security-policy");
        for directive in [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "connect-src 'self'",
            "frame-ancestors 'none'",
        ] {
            assert!(csp.contains(directive), "{path}: {csp}");
        }
        assert!(!csp.contains("unsafe"), "{path}: {csp}");
        assert_eq!(header("x-content-type-options"), "nosniff", "{path}");
        assert_eq!(header("referrer-policy"), "no-referrer", "{path}");
    }
    // Nothing inline that the policy would have to allow.
    let page = host.get("/ui").await.text();
    assert!(
        !page.contains("<script>") && !page.contains("style="),
        "{page}"
    );
    assert!(!page.contains("onclick") && !page.contains("javascript:"));

    host.get("/ui/app.json")
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    host.get("/ui/../v1/status")
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ui_false_turns_the_page_off() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.ui = false;
    let host = TestHost::start(config).await;
    for path in ["/ui", "/ui/app.js"] {
        let reply = host.get(path).await;
        reply.assert_error(StatusCode::NOT_FOUND, "not_found");
        assert!(reply.text().contains("--ui false"), "{}", reply.text());
    }
    // The JSON it would read is still there for the API's users.
    let status = host.admin(Method::GET, "/v1/status", Vec::new()).await;
    assert_eq!(status.status, StatusCode::OK);
    host.stop().await;
}

/// One `lichen serve` process of the test's cluster.
struct Member {
    child: common::Spawned,
    url: String,
    gossip: String,
    policies: PathBuf,
}

impl Member {
    fn start(root: &Path, id: &str, seed: Option<&Member>) -> Member {
        let dir = root.join(id);
        let policies = dir.join("policies");
        std::fs::create_dir_all(&policies).unwrap();
        let gossip = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .to_string();
        let mut args = vec![
            "--gossip",
            &gossip,
            "--node-id",
            id,
            "--gossip-interval-ms",
            "100",
            "--drain",
            "0s",
        ];
        if let Some(seed) = seed {
            args.extend(["--peer", &seed.gossip]);
        }
        let env = [
            ("LICHEN_ADMIN_TOKEN", TOKEN),
            ("LICHEN_CLUSTER_SECRET", SECRET),
        ];
        let (child, url, _log) = spawn_lichen_with_env(&dir, &args, &env);
        Member {
            child,
            url,
            gossip,
            policies,
        }
    }

    async fn deploy(&self, name: &str, fixture: &str) {
        let reply = send(
            Method::PUT,
            &format!("{}/v1/functions/{name}", self.url),
            &[("authorization", &format!("Bearer {TOKEN}"))],
            component(fixture),
        )
        .await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    }
}

/// Installs Chromium and playwright-core when either is missing (as the
/// test command's set-up does), and returns the browser script's folder.
fn browser_tools() -> PathBuf {
    let root = repo_root();
    let folder = root.join("host/tests/browser");
    if !Path::new("/usr/bin/chromium").exists()
        || !folder.join("node_modules/playwright-core").exists()
    {
        let status = Command::new(root.join("scripts/install-browser.sh"))
            .status()
            .expect("running scripts/install-browser.sh");
        assert!(
            status.success(),
            "installing Chromium and Playwright failed"
        );
    }
    folder
}

/// Runs the browser script to its end (or kills it past `BROWSER_RUN`).
fn run_browser(folder: &Path, env: &[(&str, String)]) -> (bool, String) {
    let output = tempfile::NamedTempFile::new().unwrap();
    let mut child = Command::new("node")
        .arg(folder.join("status-page.mjs"))
        .current_dir(folder)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(output.reopen().unwrap())
        .stderr(output.reopen().unwrap())
        .stdin(Stdio::null())
        .spawn()
        .map(|child| common::Spawned::terminated_within(child, Duration::from_secs(10)))
        .expect("running node (scripts/install-browser.sh installs it)");
    let started = Instant::now();
    let success = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.success();
        }
        if started.elapsed() > BROWSER_RUN {
            // Dropping it lets Playwright close its Chromium first.
            drop(child);
            break false;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    (success, std::fs::read_to_string(output.path()).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_in_a_real_browser() {
    let folder = browser_tools();
    let root = tempfile::tempdir().unwrap();
    let a = Member::start(root.path(), "edge-a", None);
    let b = Member::start(root.path(), "edge-b", Some(&a));
    std::fs::write(
        a.policies.join("hello.toml"),
        "[env]\nGREETING = \"from the status page test\"\n",
    )
    .unwrap();
    std::fs::write(
        a.policies.join("ticker.toml"),
        "[[triggers.cron]]\nschedule = \"* * * * * *\"\nmethod = \"GET\"\n",
    )
    .unwrap();
    let functions = [
        ("hello", "hello"),
        ("ticker", "hello"),
        ("hello-p3", "hello-p3"),
        ("square", "square"),
        ("counter", "counter"),
        ("trap", "trap"),
    ];
    for (name, fixture) in functions {
        a.deploy(name, fixture).await;
    }
    let names: Vec<&str> = functions.iter().map(|(name, _)| *name).collect();
    let screenshot = repo_root().join("target/status-page.png");
    let env = [
        ("LICHEN_URL", a.url.clone()),
        ("LICHEN_TOKEN", TOKEN.to_string()),
        ("LICHEN_POLICIES", a.policies.display().to_string()),
        ("LICHEN_FUNCTIONS", names.join(",")),
        ("LICHEN_PEER", "edge-b".to_string()),
        ("LICHEN_PEER_PID", b.child.id().to_string()),
        ("LICHEN_SCREENSHOT", screenshot.display().to_string()),
    ];
    let (success, output) = tokio::task::spawn_blocking(move || run_browser(&folder, &env))
        .await
        .unwrap();
    println!("{output}");
    assert!(success, "the browser checks failed:\n{output}");
    assert!(output.contains("all checks passed"), "{output}");
    assert!(std::fs::metadata(&screenshot).unwrap().len() > 10_000);
    drop(b);
}
