//! The registry's promises (docs/CLUSTER.md) on real hosts: nothing
//! acknowledged is lost to concurrency, a crash, a rollback, a policy edit
//! or a full disk; what cannot apply backs off and says why; a second host
//! under one node id stays out.

use std::collections::BTreeMap;
use std::time::Duration;

use http::{Method, StatusCode};

use super::{Node, SECRET, deploy_with_policy, on_nats, three, two_with};
use crate::common::{self, component, distinct, eventually, send, series_sum};
use lichen::store::sha256_hex;

/// `GET /v1/functions/{function}` on `node`.
async fn describe(node: &Node, function: &str) -> serde_json::Value {
    node.admin(
        Method::GET,
        &format!("/v1/functions/{function}"),
        Vec::new(),
    )
    .await
    .json()
}

/// Deploys `bytes` as `function` on `node`; the version id acknowledged.
async fn deploy(node: &Node, function: &str, bytes: Vec<u8>) -> u64 {
    let reply = node
        .admin(Method::PUT, &format!("/v1/functions/{function}"), bytes)
        .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    reply.json()["version"].as_u64().unwrap()
}

/// Whether `node` serves the registry's active version `id` of
/// `function`, and lists every version of `kept` (id and module).
async fn converged_on(node: &Node, function: &str, id: u64, kept: &BTreeMap<u64, String>) -> bool {
    let info = describe(node, function).await;
    let listed: BTreeMap<u64, String> = info["versions"]
        .as_array()
        .map(|versions| {
            versions
                .iter()
                .map(|v| {
                    let id = v["version"].as_u64().unwrap();
                    (id, v["sha256"].as_str().unwrap().to_string())
                })
                .collect()
        })
        .unwrap_or_default();
    info["version"] == id
        && info["active"] == id
        && kept.iter().all(|(id, sha)| listed.get(id) == Some(sha))
        && info["versions"]
            .as_array()
            .is_some_and(|v| v.iter().all(|v| v["module_here"] == true))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_deploys_on_two_hosts_keep_every_acknowledged_version() {
    let root = tempfile::tempdir().unwrap();
    let (a, b, c) = three(root.path()).await;
    let hello = component("hello");
    // id -> module, of every deploy acknowledged.
    let mut acked: BTreeMap<u64, String> = BTreeMap::new();
    let mut last = 0;
    for round in 0..4 {
        let (on_a, on_b) = (
            distinct(&hello, &format!("round {round} on a")),
            distinct(&hello, &format!("round {round} on b")),
        );
        let shas = [sha256_hex(&on_a), sha256_hex(&on_b)];
        let (id_a, id_b) = tokio::join!(deploy(&a, "race", on_a), deploy(&b, "race", on_b));
        for (id, sha) in [(id_a, &shas[0]), (id_b, &shas[1])] {
            // No id names two modules.
            assert!(acked.insert(id, sha.clone()).is_none(), "id {id} twice");
        }
        // Both hosts agree on one winner before the next round.
        let winner = describe(&a, "race").await["active"].clone();
        eventually(&format!("round {round} converges"), || async {
            let winner = describe(&a, "race").await["active"].clone();
            let on_b = describe(&b, "race").await["active"].clone();
            let on_c = describe(&c, "race").await["active"].clone();
            winner.is_u64() && winner == on_b && winner == on_c
        })
        .await;
        let winner = describe(&a, "race").await["active"]
            .as_u64()
            .unwrap_or(winner.as_u64().unwrap_or(0));
        assert!(winner == id_a || winner == id_b, "round {round}: {winner}");
        last = winner;
    }
    // Every acknowledged module is listed, fetched and kept on every host.
    for node in [&a, &b, &c] {
        eventually(&format!("{} lists all 8 versions", node.id), || async {
            converged_on(node, "race", last, &acked).await
        })
        .await;
    }
    // The losers say what superseded them, and can be rolled back to.
    let info = describe(&c, "race").await;
    for version in info["versions"].as_array().unwrap() {
        if version["active"] == false {
            assert!(version["superseded_by"].is_u64(), "{version}");
        }
    }
    let loser = *acked.keys().find(|id| **id != last).unwrap();
    let back = c
        .admin(
            Method::POST,
            "/v1/functions/race/rollback",
            format!(r#"{{"version": {loser}}}"#).into_bytes(),
        )
        .await;
    assert_eq!(back.status, StatusCode::OK, "{}", back.text());
    for node in [&a, &b] {
        eventually(
            &format!("{} runs the version rolled back to", node.id),
            || async { describe(node, "race").await["version"] == loser },
        )
        .await;
    }
    // Each host that met the other's deploy of a round counted a conflict.
    let mut conflicts = 0.0;
    for node in [&a, &b, &c] {
        conflicts += series_sum(&node.metrics().await, "lichen_registry_conflicts_total");
    }
    assert!(conflicts >= 4.0, "{conflicts} conflicts counted");
    let status = a.admin(Method::GET, "/v1/status", Vec::new()).await.json();
    assert!(
        !status["cluster"]["conflicts"]
            .as_array()
            .unwrap()
            .is_empty(),
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_survives_its_host_crashing_before_any_peer_applied_it() {
    let root = tempfile::tempdir().unwrap();
    let hello = component("hello");
    let mut a = Node::start(root.path(), "a", &[], SECRET);
    let mut b = Node::start(root.path(), "b", &[&a], SECRET);
    let v1 = deploy(&a, "app", distinct(&hello, "v1")).await;
    eventually("b serves v1", || async {
        describe(&b, "app").await["version"] == v1
    })
    .await;

    // b down; v2 deployed on a, which is killed before anyone saw it.
    b.kill();
    let v2 = deploy(&a, "app", distinct(&hello, "v2")).await;
    a.kill();
    let mut a = Node::start(root.path(), "a", &[], SECRET);
    let mut b = Node::start(root.path(), "b", &[&a], SECRET);
    for node in [&a, &b] {
        eventually(
            &format!("{} serves v2 after both restart", node.id),
            || async { describe(node, "app").await["version"] == v2 },
        )
        .await;
    }

    // The same for a rollback: b down, a rolls back to v1 and is killed.
    b.kill();
    let back = a
        .admin(Method::POST, "/v1/functions/app/rollback", Vec::new())
        .await;
    assert_eq!(back.json()["version"], v1, "{}", back.text());
    a.kill();
    let a = Node::start(root.path(), "a", &[], SECRET);
    let b = Node::start(root.path(), "b", &[&a], SECRET);
    for node in [&a, &b] {
        eventually(
            &format!("{} serves v1 after the rollback and restarts", node.id),
            || async { describe(node, "app").await["version"] == v1 },
        )
        .await;
    }
    // The record on disk kept the deploy's stamp and origin.
    let record = super::record_of(&b, "app");
    let v2_entry = record["entry"]["versions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["id"] == v2)
        .cloned()
        .unwrap();
    assert_eq!(v2_entry["origin"], "a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_edits_racing_deploys_end_with_the_last_of_each_everywhere() {
    let root = tempfile::tempdir().unwrap();
    let (a, b, c) = three(root.path()).await;
    let hello = component("hello");
    deploy(&a, "app", distinct(&hello, "first")).await;
    for node in [&b, &c] {
        eventually(&format!("{} serves app", node.id), || async {
            node.post("/fn/app", "").await.status == StatusCode::OK
        })
        .await;
    }
    let policy = |i: usize| format!("# edit {i}\n[limits]\nconcurrency = {}\n", 1 + i % 7);
    const EDITS: usize = 1000;
    let edits = async {
        for i in 0..EDITS {
            let put = a
                .admin(
                    Method::PUT,
                    "/v1/functions/app/policy",
                    policy(i).into_bytes(),
                )
                .await;
            assert_eq!(put.status, StatusCode::OK, "{}", put.text());
        }
    };
    let deploys = async {
        let mut last = 0;
        for i in 0..8 {
            last = deploy(&b, "app", distinct(&hello, &format!("deploy {i}"))).await;
        }
        last
    };
    let ((), last) = tokio::join!(edits, deploys);
    let last_policy = policy(EDITS - 1);
    for node in [&a, &b, &c] {
        eventually(
            &format!("{} runs the last deploy under the last policy", node.id),
            || async {
                let info = describe(node, "app").await;
                let file =
                    std::fs::read_to_string(node.dir.join("policies/app.toml")).unwrap_or_default();
                info["version"] == last
                    && info["active"] == last
                    && file == last_policy
                    && info["policy"]["in_force"]["limits"]["concurrency"] == 1 + (EDITS - 1) % 7
            },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_that_cannot_apply_backs_off_and_says_why() {
    let root = tempfile::tempdir().unwrap();
    let (hello, echo) = (component("hello"), component("echo"));
    assert!(hello.len() < echo.len());
    // b takes modules up to between the two sizes: it can fetch hello,
    // never echo.
    let limit = ((hello.len() + echo.len()) / 2).to_string();
    let a = Node::start(root.path(), "a", &[], SECRET);
    let b = Node::start_with(
        root.path(),
        "b",
        &[&a],
        SECRET,
        &["--max-upload-bytes", &limit],
    );
    let v1 = deploy(&a, "app", hello).await;
    eventually("b serves hello", || async {
        describe(&b, "app").await["version"] == v1
    })
    .await;
    let v2 = deploy(&a, "app", echo).await;
    eventually("b says why it cannot apply echo", || async {
        let info = describe(&b, "app").await;
        info["active"] == v2
            && info["converged"] == false
            && info["apply_error"]
                .as_str()
                .is_some_and(|e| e.contains("upload limit"))
    })
    .await;
    // It keeps serving what it has.
    let url = format!("{}/fn/app", b.url);
    let reply = send(Method::POST, &url, &[], b"ping".to_vec()).await;
    assert!(reply.text().contains("Hello"), "{}", reply.text());
    // Backing off: 1 s, 2 s, 4 s... so at most four tries in the next
    // seven seconds, where a try a second would make seven or more.
    let failures = || async {
        series_sum(
            &b.metrics().await,
            "lichen_registry_apply_failures_total{function=\"app\"",
        )
    };
    let before = failures().await;
    assert!(before >= 1.0);
    tokio::time::sleep(Duration::from_secs(7)).await;
    let tries = failures().await - before;
    assert!(tries <= 4.0, "{tries} tries in 7 s");
    let status = b.admin(Method::GET, "/v1/status", Vec::new()).await.json();
    assert!(
        status["cluster"]["apply_errors"]["app"].is_string(),
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_too_large_to_gossip_is_refused_and_a_large_one_travels() {
    let root = tempfile::tempdir().unwrap();
    let a = Node::start(root.path(), "a", &[], SECRET);
    let b = Node::start(root.path(), "b", &[&a], SECRET);
    deploy(&a, "app", component("hello")).await;
    let padded = |bytes: usize| {
        let mut text = String::from("[limits]\nconcurrency = 2\n");
        while text.len() < bytes {
            text.push_str("# a comment that pads the policy out to its size\n");
        }
        text
    };
    let too_large = padded(50 << 10);
    let refused = a
        .admin(
            Method::PUT,
            "/v1/functions/app/policy",
            too_large.into_bytes(),
        )
        .await;
    refused.assert_error(StatusCode::PAYLOAD_TOO_LARGE, "too_large");
    assert!(refused.text().contains("49152"), "{}", refused.text());
    assert!(!a.dir.join("policies/app.toml").exists());
    // Just under the limit, with room for the versions to come.
    let large = padded(44 << 10);
    let put = a
        .admin(
            Method::PUT,
            "/v1/functions/app/policy",
            large.clone().into_bytes(),
        )
        .await;
    assert_eq!(put.status, StatusCode::OK, "{}", put.text());
    eventually("b has the large policy", || async {
        std::fs::read_to_string(b.dir.join("policies/app.toml")).is_ok_and(|t| t == large)
    })
    .await;
    // And later deploys still travel.
    let v2 = deploy(&a, "app", distinct(&component("hello"), "v2")).await;
    eventually("b serves v2", || async {
        describe(&b, "app").await["version"] == v2
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_host_under_one_node_id_stays_out() {
    let root = tempfile::tempdir().unwrap();
    let (a, b) = two_with(root.path(), &[]).await;
    // Another host started as "a", in a directory of its own.
    let twin = Node::start(&root.path().join("twin"), "a", &[&b], SECRET);
    eventually("the twin is not ready and says why", || async {
        let ready = send(
            Method::GET,
            &format!("{}/readyz", twin.url),
            &[],
            Vec::new(),
        )
        .await;
        ready.status == StatusCode::SERVICE_UNAVAILABLE
            && ready.text().contains("node id")
            && ready.text().contains(&a.gossip)
    })
    .await;
    // The first "a" carries on.
    let ready = send(Method::GET, &format!("{}/readyz", a.url), &[], Vec::new()).await;
    assert_eq!(ready.status, StatusCode::OK, "{}", ready.text());
    let v1 = deploy(&a, "app", component("hello")).await;
    eventually("b serves a's deploy", || async {
        describe(&b, "app").await["version"] == v1
    })
    .await;
    assert!(describe(&twin, "app").await["version"].is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_names_its_module_and_another_one_is_not_run() {
    let root = tempfile::tempdir().unwrap();
    let a = Node::start(root.path(), "a", &[], SECRET);
    let b = Node::start(root.path(), "b", &[&a], SECRET);
    let v1 = deploy(&a, "app", component("hello")).await;
    eventually("b serves v1", || async {
        describe(&b, "app").await["version"] == v1
    })
    .await;
    let sha = describe(&b, "app").await["sha256"]
        .as_str()
        .unwrap()
        .to_string();
    // As a peer forwards: the hop header, a signature, the module.
    let forwarded = |module: String| {
        let url = format!("{}/fn/app", b.url);
        async move {
            let carried = [
                ("x-lichen-forwarded-by", "a"),
                ("x-lichen-module", module.as_str()),
            ];
            let signature = common::peer_signature(
                SECRET,
                "POST",
                &url,
                "b",
                &carried,
                Some(b"ping".as_slice()),
            );
            send(
                Method::POST,
                &url,
                &[
                    ("x-lichen-forwarded-by", "a"),
                    ("x-lichen-peer-signature", &signature),
                    ("x-lichen-module", &module),
                ],
                b"ping".to_vec(),
            )
            .await
        }
    };
    let other = "0".repeat(64);
    let refused = forwarded(other).await;
    refused.assert_error(StatusCode::CONFLICT, "module_mismatch");
    assert_eq!(refused.headers["x-lichen-module-mismatch"], "1");
    let run = forwarded(sha).await;
    assert_eq!(run.status, StatusCode::OK, "{}", run.text());
    assert!(run.text().contains("Hello"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_on_a_full_disk_fails_and_keeps_the_function() {
    let root = tempfile::tempdir().unwrap();
    // The host's data directory on a small tmpfs of its own.
    let data = root.path().join("small");
    std::fs::create_dir_all(&data).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
        .arg(&data)
        .status()
        .expect("running mount");
    assert!(
        mounted.success(),
        "mounting a tmpfs (the test runs as root)"
    );
    let _unmount = Unmount(data.clone());
    let config = common::test_config(&data);
    let host = common::TestHost::start(config).await;
    let deployed = host.deploy("app", component("hello")).await;
    assert_eq!(deployed.status, StatusCode::CREATED, "{}", deployed.text());
    // Fill what is left.
    let filler = data.join("filler");
    let mut file = std::fs::File::create(&filler).unwrap();
    let block = vec![0u8; 64 << 10];
    while std::io::Write::write_all(&mut file, &block).is_ok() {}
    drop(file);
    let refused = host
        .admin(Method::DELETE, "/v1/functions/app", Vec::new())
        .await;
    refused.assert_error(StatusCode::INSUFFICIENT_STORAGE, "disk_full");
    assert_eq!(host.get("/fn/app").await.status, StatusCode::OK);
    // Room again: the delete goes through.
    std::fs::remove_file(&filler).unwrap();
    let deleted = host
        .admin(Method::DELETE, "/v1/functions/app", Vec::new())
        .await;
    assert_eq!(deleted.status, StatusCode::OK, "{}", deleted.text());
    assert_eq!(host.get("/fn/app").await.status, StatusCode::NOT_FOUND);
    host.stop().await;
}

/// Unmounts a test's tmpfs when dropped.
struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_request_keeps_its_host_and_a_client_cannot_set_it() {
    let root = tempfile::tempdir().unwrap();
    let a = Node::start(root.path(), "a", &[], SECRET);
    let b = Node::start(root.path(), "b", &[&a], SECRET);
    let v1 = deploy(&a, "echo", component("echo")).await;
    eventually("b serves echo", || async {
        describe(&b, "echo").await["version"] == v1
    })
    .await;
    let sha = describe(&b, "echo").await["sha256"]
        .as_str()
        .unwrap()
        .to_string();
    // As a forward from a carries it: the client's Host beside a's own.
    let url = format!("{}/fn/echo/x", b.url);
    let carried = [
        ("x-lichen-forwarded-by", "a"),
        ("x-lichen-module", sha.as_str()),
        ("x-lichen-forwarded-host", "shop.test"),
    ];
    let signature =
        common::peer_signature(SECRET, "GET", &url, "b", &carried, Some(b"".as_slice()));
    let forwarded = send(
        Method::GET,
        &url,
        &[
            ("x-lichen-forwarded-by", "a"),
            ("x-lichen-peer-signature", &signature),
            ("x-lichen-module", &sha),
            ("x-lichen-forwarded-host", "shop.test"),
        ],
        Vec::new(),
    )
    .await;
    assert_eq!(forwarded.status, StatusCode::OK, "{}", forwarded.text());
    assert_eq!(forwarded.json()["authority"], "shop.test");
    // From a client the header is dropped: the guest sees the real Host.
    let direct = send(
        Method::GET,
        &format!("{}/fn/echo/x", b.url),
        &[("x-lichen-forwarded-host", "shop.test")],
        Vec::new(),
    )
    .await;
    assert_eq!(direct.status, StatusCode::OK, "{}", direct.text());
    let authority = direct.json()["authority"].as_str().unwrap().to_string();
    assert!(authority.starts_with("127.0.0.1:"), "{authority}");
    assert!(!direct.text().contains("shop.test"), "{}", direct.text());
}

/// Whoever can write NATS but holds no cluster secret cannot set a policy:
/// an entry written straight into the `lichen-registry` bucket (the JSON a
/// host used to write, naming a policy that claims the admin's names) is
/// refused by every host, counted, and changes nothing; the next real
/// change of the name overwrites it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_registry_entry_written_into_nats_changes_nothing_and_is_counted() {
    let root = tempfile::tempdir().unwrap();
    let nats = common::NatsServer::start(&root.path().join("nats"));
    let mut flags = on_nats(&nats.url);
    flags.extend(["--cluster-registry", "nats"].map(String::from));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let (a, b) = two_with(root.path(), &flags).await;
    deploy_with_policy(&a, &[&b], "hello", "[limits]\nconcurrency = 2\n").await;
    let client = async_nats::connect(&nats.url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let bucket = js.get_key_value("lichen-registry").await.unwrap();
    let real = bucket.get("hello").await.unwrap().unwrap();
    assert!(
        !String::from_utf8_lossy(&real).contains("concurrency"),
        "the policy is sealed in NATS, not readable"
    );
    let forged = serde_json::json!({
        "name": "hello",
        "versions": [],
        "policy": { "text": "[outbound]\nallow = [\"http://127.0.0.1:*\"]\n", "stamp": u64::MAX / 2, "origin": "z" }
    });
    bucket
        .put("hello", serde_json::to_vec(&forged).unwrap().into())
        .await
        .unwrap();
    bucket
        .put("mallory", b"{\"name\":\"mallory\"}".to_vec().into())
        .await
        .unwrap();
    for node in [&a, &b] {
        eventually(
            &format!("{} counts the forged entries", node.id),
            || async { series_sum(&node.metrics().await, "lichen_registry_rejected_total") >= 1.0 },
        )
        .await;
        let policy = node
            .admin(Method::GET, "/v1/functions/hello/policy", Vec::new())
            .await
            .json();
        assert_eq!(policy["in_force"]["limits"]["concurrency"], 2, "{policy}");
        assert_eq!(
            node.admin(Method::GET, "/v1/functions/mallory", Vec::new())
                .await
                .status,
            StatusCode::NOT_FOUND
        );
        let file = std::fs::read_to_string(node.dir.join("policies/hello.toml")).unwrap();
        assert!(!file.contains("outbound"), "{file}");
    }
    // A real change writes over the forged entry, and reaches b.
    let policy = "[limits]\nconcurrency = 3\n";
    let put = a
        .admin(
            Method::PUT,
            "/v1/functions/hello/policy",
            policy.as_bytes().to_vec(),
        )
        .await;
    assert_eq!(put.status, StatusCode::OK, "{}", put.text());
    eventually("b has the real change", || async {
        std::fs::read_to_string(b.dir.join("policies/hello.toml")).is_ok_and(|t| t == policy)
    })
    .await;
    eventually("b serves hello", || async {
        b.post("/fn/hello", "").await.status == StatusCode::OK
    })
    .await;
}
