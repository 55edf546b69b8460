//! A policy written by a scoped token grants nothing the token does not
//! hold: each field that reaches outside the sandbox (the table in
//! `lichen_core::grants`) needs its scope, what reaches the host itself
//! needs the admin token, and a guest deployed by a scoped token never
//! reads the host's data directory whatever policy the token writes.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use async_nats::jetstream;
use http::{Method, StatusCode};

use crate::common::{self, NatsServer, Reply, TestHost, component, send, test_config, with_token};
use lichen::server::KvConfig;

/// Each policy field reaching outside the sandbox: a policy writing it
/// (for the function `team-a-x`), and the scope that grants it.
const FIELDS: &[(&str, &str, &str)] = &[
    (
        "files",
        "[files]\n\"/shared\" = \"shared/team-a\"\n",
        "files:shared/team-a*",
    ),
    (
        "outbound.allow",
        "[outbound]\nallow = [\"https://api.team-a.example\"]\n",
        "outbound:*.team-a.example",
    ),
    (
        "outbound.tcp",
        "[outbound]\ntcp = [\"10.20.0.5:5432\"]\n",
        "tcp:10.20.0.0/16",
    ),
    (
        "config",
        "[config]\npg = { secret = \"team-a-pg\" }\n",
        "secrets:team-a-*",
    ),
    (
        "triggers.nats.stream",
        "[[triggers.nats]]\nstream = \"team-a-orders\"\n",
        "streams:team-a-*",
    ),
    (
        "triggers.nats.dead_letter",
        "[[triggers.nats]]\nstream = \"team-a-orders\"\ndead_letter = \"team-a-dead.orders\"\n",
        "streams:team-a-*",
    ),
    (
        "http.hosts",
        "[http]\nhosts = [\"x.team-a.example\"]\n",
        "hosts:*.team-a.example",
    ),
];

const DEPLOY: &str = "functions:deploy:team-a-*";

/// A host on a real nats-server (so NATS triggers are checked for real),
/// with its policies beside its data directory, as in production, and
/// `team-a-x` (the probe) deployed.
struct Setup {
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
    _nats: NatsServer,
    host: TestHost,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let nats = NatsServer::start(&root.join("nats"));
    let client = async_nats::connect(&nats.url).await.unwrap();
    jetstream::new(client)
        .create_stream(jetstream::stream::Config {
            name: "team-a-orders".to_string(),
            subjects: vec!["team-a.orders".to_string()],
            ..Default::default()
        })
        .await
        .unwrap();
    std::fs::create_dir_all(root.join("shared/team-a")).unwrap();
    std::fs::write(root.join("shared/team-a/hello.txt"), "hello team a").unwrap();
    let mut config = test_config(&root.join("data"));
    config.policies_dir = root.join("policies");
    config.kv = KvConfig::Nats {
        urls: vec![nats.url.clone()],
        replicas: 1,
        timeout: Duration::from_secs(10),
    };
    let host = TestHost::start(config).await;
    let deployed = host.deploy("team-a-x", component("probe")).await;
    assert_eq!(deployed.status, StatusCode::CREATED, "{}", deployed.text());
    for secret in ["team-a-pg", "team-b-pg"] {
        let set = host
            .admin(
                Method::PUT,
                &format!("/v1/secrets/{secret}"),
                format!("{secret}-value").into_bytes(),
            )
            .await;
        assert!(set.status.is_success(), "{}", set.text());
    }
    Setup {
        _dir: dir,
        root,
        _nats: nats,
        host,
    }
}

async fn token(host: &TestHost, name: &str, scopes: &[&str]) -> String {
    common::make_token(
        &host.url,
        &host.token,
        serde_json::json!({ "name": name, "scopes": scopes }),
    )
    .await
}

async fn put_policy(host: &TestHost, token: &str, policy: &str) -> Reply {
    with_token(
        &host.url,
        token,
        Method::PUT,
        "/v1/functions/team-a-x/policy",
        policy.as_bytes().to_vec(),
    )
    .await
}

/// The second table of the issue: each field written by a token lacking
/// its scope is `403 missing_scope` naming the field and the scope; with
/// the scope it is `200`. The refusals are in the audit log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_policy_field_needs_its_scope_and_is_granted_by_it() {
    for field in lichen_core::grants::FIELDS {
        assert!(
            FIELDS.iter().any(|(name, ..)| *name == field.name),
            "the policy field {} has no row in this test's table",
            field.name
        );
    }
    let setup = setup().await;
    let host = &setup.host;
    for (index, (field, policy, scope)) in FIELDS.iter().enumerate() {
        let without = token(host, &format!("without-{index}"), &[DEPLOY]).await;
        let refused = put_policy(host, &without, policy).await;
        refused.assert_error(StatusCode::FORBIDDEN, "missing_scope");
        let kind = scope.split(':').next().unwrap();
        let text = refused.text();
        assert!(
            text.contains(&format!("{kind}:")) && text.contains(field.split('.').next().unwrap()),
            "{field}: {text}"
        );
        let with = token(host, &format!("with-{index}"), &[DEPLOY, scope]).await;
        let granted = put_policy(host, &with, policy).await;
        assert_eq!(
            granted.status,
            StatusCode::OK,
            "{field}: {}",
            granted.text()
        );
    }
    let log = host
        .admin(Method::GET, "/v1/audit?function=team-a-x", Vec::new())
        .await
        .json();
    let refusals = log["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["code"] == "missing_scope" && e["result"] == 403)
        .count();
    assert_eq!(refusals, FIELDS.len(), "{log}");
}

/// The three escalations the issue names, and their kin: a token holding
/// every scope a policy can need still cannot map the host's own
/// directories, name its loopback or NATS, take another team's secret, or
/// ask for more than the operator's ceilings. The admin token can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_reaches_the_host_itself_needs_the_admin_token() {
    let setup = setup().await;
    let host = &setup.host;
    std::os::unix::fs::symlink(setup.root.join("data"), setup.root.join("shared/link")).unwrap();
    let wide = token(
        host,
        "team-a-wide",
        &[
            DEPLOY,
            "files:*",
            "outbound:*",
            "outbound:0.0.0.0/0",
            "tcp:*",
            "tcp:0.0.0.0/0",
            "secrets:team-a-*",
            "streams:*",
        ],
    )
    .await;
    let nats_port = setup._nats.url.rsplit(':').next().unwrap().to_string();
    for (policy, code, says) in [
        ("[files]\n\"/d\" = \"data\"\n", "admin_only", "files"),
        ("[files]\n\"/d\" = \".\"\n", "admin_only", "files"),
        ("[files]\n\"/d\" = \"policies\"\n", "admin_only", "files"),
        ("[files]\n\"/d\" = \"shared/link\"\n", "admin_only", "files"),
        ("[files]\n\"/d\" = \"/\"\n", "admin_only", "absolute"),
        (
            "[files]\n\"/d\" = \"shared/../data\"\n",
            "admin_only",
            "'..'",
        ),
        (
            &format!("[outbound]\ntcp = [\"127.0.0.1:{nats_port}\"]\n"),
            "admin_only",
            "loopback",
        ),
        (
            "[outbound]\ntcp = [\"0.0.0.0/0:4222\"]\n",
            "admin_only",
            "loopback",
        ),
        (
            "[outbound]\nallow = [\"http://127.0.0.1:*\"]\n",
            "admin_only",
            "loopback",
        ),
        (
            "[outbound]\nallow = [\"http://169.254.169.254\"]\n",
            "admin_only",
            "link-local",
        ),
        (
            "[config]\npg = { secret = \"team-b-pg\" }\n",
            "missing_scope",
            "secrets:team-b-pg",
        ),
        (
            "[[triggers.nats]]\nstream = \"team-a-orders\"\ndead_letter = \"$KV.lichen-registry.team-b\"\n",
            "admin_only",
            "$KV",
        ),
        (
            "[limits]\nmemory = \"1GiB\"\n",
            "admin_only",
            "limits.memory",
        ),
        (
            "[limits]\ntimeout = \"10m\"\n",
            "admin_only",
            "limits.timeout",
        ),
        ("[instances]\nmax = 500\n", "admin_only", "instances.max"),
    ] {
        let refused = put_policy(host, &wide, policy).await;
        refused.assert_error(StatusCode::FORBIDDEN, code);
        assert!(
            refused.text().contains(says),
            "{policy}: {}",
            refused.text()
        );
    }
    // Nothing was written: the function has no policy file.
    assert!(!setup.root.join("policies/team-a-x.toml").exists());
    // The operator can, and the ceiling within bounds is fine for the team.
    let admin = host
        .admin(
            Method::PUT,
            "/v1/functions/team-a-x/policy",
            b"[limits]\nmemory = \"1GiB\"\n".to_vec(),
        )
        .await;
    assert_eq!(admin.status, StatusCode::OK, "{}", admin.text());
    let within = put_policy(host, &wide, "[limits]\nmemory = \"256MiB\"\n").await;
    assert_eq!(within.status, StatusCode::OK, "{}", within.text());
    // Refusals are audited with the token's name and the reason's code.
    let log = host
        .admin(Method::GET, "/v1/audit?function=team-a-x", Vec::new())
        .await
        .json();
    let admin_only = log["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["code"] == "admin_only" && e["token"] == "team-a-wide")
        .count();
    assert!(admin_only >= 13, "{log}");
}

/// A small deterministic generator (xorshift), so a failing policy is the
/// same on every run.
struct Rng(u64);

impl Rng {
    fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        from[(self.0 % from.len() as u64) as usize]
    }
}

/// Generated policies, written by a token with every scope a policy can
/// need: whatever the host accepts, the probe guest reads no byte of the
/// data directory, of `/proc/1/environ` or of another team's secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scoped_tokens_guest_never_reads_the_hosts_secrets_whatever_policy_it_writes() {
    let setup = setup().await;
    let host = &setup.host;
    let root = &setup.root;
    let data = root.join("data");
    let canary = "canary-7f3a9c1e-of-the-data-directory";
    std::fs::write(data.join("canary"), canary).unwrap();
    std::os::unix::fs::symlink(&data, root.join("shared/team-a/data-link")).unwrap();
    let secrets_key = std::fs::read_to_string(data.join("secrets.key")).unwrap_or_default();
    let wide = token(
        host,
        "team-a-prop",
        &[DEPLOY, "files:*", "outbound:*", "tcp:*", "secrets:team-a-*"],
    )
    .await;
    let host_paths = [
        "shared/team-a",
        "shared",
        "data",
        ".",
        "..",
        "/",
        "/proc",
        "shared/team-a/data-link",
        "shared/../data",
        "policies",
        "./data",
        "data/",
        "shared/team-a/../../data",
    ];
    let guest_paths = ["/d", "/", "/data", "/proc", "/team"];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut accepted = 0;
    for round in 0..100 {
        // One mapping drawn from everything, one from what a team may map,
        // so some policies pass and their guests are tried.
        let mut policy = format!(
            "[files]\n{:?} = {:?}\n\"/team\" = {:?}\n",
            rng.pick(&guest_paths),
            rng.pick(&host_paths),
            rng.pick(&["shared/team-a", "shared"]),
        );
        policy.push_str(&format!(
            "[env]\nROUND = \"{round}\"\n[config]\nk = {{ secret = {:?} }}\n",
            rng.pick(&["team-a-pg", "team-b-pg"])
        ));
        let put = put_policy(host, &wide, &policy).await;
        if put.status != StatusCode::OK {
            // A guest path mapped twice is the policy's own error (400).
            assert!(
                put.status == StatusCode::FORBIDDEN || put.status == StatusCode::BAD_REQUEST,
                "{policy}: {}",
                put.text()
            );
            continue;
        }
        accepted += 1;
        let mut seen = String::new();
        for guest in guest_paths {
            for (route, path) in [
                ("list", guest.to_string()),
                ("read", format!("{guest}/canary")),
                ("read", format!("{guest}/secrets.key")),
                ("read", format!("{guest}/data-link/canary")),
                ("read", format!("{guest}/../data/canary")),
                ("read", "/proc/1/environ".to_string()),
            ] {
                let reply = invoke(&host.url, route, &path).await;
                seen.push_str(&reply.text());
            }
        }
        assert!(!seen.contains(canary), "{policy} read the data directory");
        assert!(
            secrets_key.trim().is_empty() || !seen.contains(secrets_key.trim()),
            "{policy} read the secrets key"
        );
        assert!(!seen.contains("team-b-pg-value"), "{policy}");
    }
    assert!(
        accepted >= 5,
        "only {accepted} generated policies were accepted"
    );
}

async fn invoke(url: &str, route: &str, path: &str) -> Reply {
    let encoded: String = path
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    send(
        Method::GET,
        &format!("{url}/fn/team-a-x/{route}?path={encoded}"),
        &[],
        Vec::new(),
    )
    .await
}

/// Reading does not leak credentials: `[access] tokens` are kept (on disk,
/// in the registry, in the API) as hashes, a plain one in a file from
/// before is replaced by its hash at load, and `[env]` values and
/// `[config]` texts are `<redacted>` for every reader but the admin token,
/// in the API and in `/v1/status` (what the status page shows).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_a_policy_never_shows_a_credential() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // A file from before hashes, with a plain token.
    common::write_policy(
        &data,
        "team-a-old",
        "# kept\n[access]\npublic = false\ntokens = [\"old-plain-token\"]\n",
    );
    let host = TestHost::start(test_config(&data)).await;
    let policies = data.join("policies");
    let old = std::fs::read_to_string(policies.join("team-a-old.toml")).unwrap();
    assert!(
        !old.contains("old-plain-token") && old.contains("sha256:") && old.contains("# kept"),
        "{old}"
    );
    for name in ["team-a-old", "team-a-x"] {
        let deployed = host.deploy(name, component("hello")).await;
        assert_eq!(deployed.status, StatusCode::CREATED, "{}", deployed.text());
    }
    let secret_policy = "[env]\nAPI_KEY = \"env-value-42\"\n[config]\nurl = \"postgres://u:config-value-43@db\"\n[access]\npublic = false\ntokens = [\"fn-token-44\"]\n";
    let put = host
        .admin(
            Method::PUT,
            "/v1/functions/team-a-x/policy",
            secret_policy.as_bytes().to_vec(),
        )
        .await;
    assert_eq!(put.status, StatusCode::OK, "{}", put.text());
    assert!(!put.text().contains("fn-token-44"), "{}", put.text());
    let file = std::fs::read_to_string(policies.join("team-a-x.toml")).unwrap();
    assert!(!file.contains("fn-token-44"), "{file}");
    // The tokens still open their functions; the hashes do not.
    for (function, token) in [
        ("team-a-x", "fn-token-44"),
        ("team-a-old", "old-plain-token"),
    ] {
        let url = format!("{}/fn/{function}/", host.url);
        let auth = format!("Bearer {token}");
        let ok = send(Method::GET, &url, &[("authorization", &auth)], Vec::new()).await;
        assert_eq!(ok.status, StatusCode::OK, "{function}: {}", ok.text());
        let hash = lichen_core::policy::access_token_hash(token);
        let with_hash = format!("Bearer sha256:{hash}");
        let refused = send(
            Method::GET,
            &url,
            &[("authorization", &with_hash)],
            Vec::new(),
        )
        .await;
        assert_eq!(refused.status, StatusCode::FORBIDDEN, "{}", refused.text());
        let with_hex = format!("Bearer {hash}");
        let refused = send(
            Method::GET,
            &url,
            &[("authorization", &with_hex)],
            Vec::new(),
        )
        .await;
        assert_eq!(refused.status, StatusCode::FORBIDDEN, "{}", refused.text());
    }
    // Readers with scopes see no credential; the admin sees the values
    // (and the tokens' hashes only).
    let reader = token(&host, "reader", &["functions:read", "status:read"]).await;
    let deployer = token(&host, "deployer", &[DEPLOY]).await;
    let secrets = ["env-value-42", "config-value-43", "fn-token-44"];
    for (who, bearer) in [("reader", &reader), ("deployer", &deployer)] {
        for path in [
            "/v1/functions/team-a-x",
            "/v1/functions/team-a-x/policy",
            "/v1/status?function=team-a-x",
        ] {
            if who == "deployer" && path.starts_with("/v1/status") {
                continue;
            }
            let read = with_token(&host.url, bearer, Method::GET, path, Vec::new()).await;
            assert_eq!(read.status, StatusCode::OK, "{who} {path}: {}", read.text());
            let text = read.text();
            assert!(text.contains("<redacted>"), "{who} {path}: {text}");
            for secret in secrets {
                assert!(
                    !text.contains(secret),
                    "{who} {path} shows {secret}: {text}"
                );
            }
        }
    }
    // What a redacted read shows cannot be written back as a value.
    let read = with_token(
        &host.url,
        &deployer,
        Method::GET,
        "/v1/functions/team-a-x/policy",
        Vec::new(),
    )
    .await
    .json();
    let shown = toml::to_string(&read["in_force"]).unwrap();
    with_token(
        &host.url,
        &deployer,
        Method::PUT,
        "/v1/functions/team-a-x/policy",
        shown.into_bytes(),
    )
    .await
    .assert_error(StatusCode::BAD_REQUEST, "invalid_policy");
    let admin = host
        .admin(Method::GET, "/v1/status?function=team-a-x", Vec::new())
        .await
        .text();
    assert!(
        admin.contains("env-value-42") && admin.contains("config-value-43"),
        "{admin}"
    );
    assert!(!admin.contains("fn-token-44"), "{admin}");
    host.stop().await;
}
