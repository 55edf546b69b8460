//! Secrets in a cluster: set on one host and in force on its peers, rotated
//! or removed on another and seen by the next invocation everywhere, and
//! never plain in gossip: not in the datagrams, and not in the chitchat
//! messages inside them once opened with the cluster secret and decoded
//! (chitchat compresses what it sends, so the bytes alone prove nothing).

use std::path::Path;

use chitchat::ChitchatEnvelope;
use http::{Method, StatusCode};
use lichen_core::seal::{Keyring, ReplayGuard, Secret, open_datagram};

use super::security::recording_relay;
use super::{Node, SECRET, deploy_fixture_with_policy};
use crate::common::{self, eventually, unix_ms};

const POLICY: &str = "[config]\ndb_password = { secret = \"pg\" }\n";

/// Values no other part of the test, the fixture or the host writes.
const FIRST: &str = "first-3f9e61c0-plain-value";
const ROTATED: &str = "rotated-c27a45d8-plain-value";
const SPARE: &str = "spare-81d0be37-plain-value";

/// The value `node`'s `cfg` function reads for `db_password`.
async fn password(node: &Node) -> Option<String> {
    let reply = node.post("/fn/cfg/?key=db_password", "").await;
    if reply.status != StatusCode::OK {
        return None;
    }
    reply.json()["value"].as_str().map(str::to_string)
}

/// The names of the secrets `node` lists.
async fn names(node: &Node) -> Vec<String> {
    let listed = node.admin(Method::GET, "/v1/secrets", Vec::new()).await;
    assert_eq!(listed.status, StatusCode::OK, "{}", listed.text());
    listed.json()["secrets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect()
}

/// Every file under `dir` holding one of `values`, and which.
fn files_holding(dir: &Path, values: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    for file in common::files_under(dir) {
        let bytes = std::fs::read(&file).unwrap_or_default();
        for value in values {
            if contains(&bytes, value) {
                found.push(format!("{} holds {value}", file.display()));
            }
        }
    }
    found
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_spreads_sealed_and_each_change_reaches_every_host() {
    let root = tempfile::tempdir().unwrap();
    let debug = [("RUST_LOG", "debug")];
    let a = Node::launch_env(root.path(), "a", &free_gossip(), &[], SECRET, &[], &debug);
    for (name, value) in [("pg", FIRST), ("spare", SPARE)] {
        let set = a
            .admin(
                Method::PUT,
                &format!("/v1/secrets/{name}"),
                value.as_bytes().to_vec(),
            )
            .await;
        assert_eq!(set.status, StatusCode::CREATED, "{}", set.text());
    }
    deploy_fixture_with_policy(&a, &[], "cfg", "config-rc1", POLICY).await;
    eventually("a's function reads the secret", || async {
        password(&a).await.as_deref() == Some(FIRST)
    })
    .await;

    // b knows only the relay in front of a, so its first exchange (a's
    // whole state, the secrets included) passes through the relay.
    let (relay, captured, task) = recording_relay(a.gossip.parse().unwrap()).await;
    let relay = relay.to_string();
    let b = Node::launch_env(
        root.path(),
        "b",
        &free_gossip(),
        &[],
        SECRET,
        &["--peer", &relay],
        &debug,
    );
    eventually("b's function reads the secret set on a", || async {
        password(&b).await.as_deref() == Some(FIRST)
    })
    .await;
    assert_eq!(names(&b).await, ["pg", "spare"]);

    // Rotated on b: the next invocation on either host reads the new value.
    let rotated = b
        .admin(Method::PUT, "/v1/secrets/pg", ROTATED.as_bytes().to_vec())
        .await;
    assert_eq!(rotated.status, StatusCode::OK, "{}", rotated.text());
    assert_eq!(password(&b).await.as_deref(), Some(ROTATED));
    eventually("a reads the secret rotated on b", || async {
        password(&a).await.as_deref() == Some(ROTATED)
    })
    .await;

    // Removed on b: gone from a, and still gone after a restarts (its
    // older value does not come back from a's disk or from gossip).
    let in_use = b.admin(Method::DELETE, "/v1/secrets/pg", Vec::new()).await;
    assert_eq!(in_use.status, StatusCode::CONFLICT, "{}", in_use.text());
    let removed = b
        .admin(Method::DELETE, "/v1/secrets/spare", Vec::new())
        .await;
    assert_eq!(removed.status, StatusCode::OK, "{}", removed.text());
    eventually("a forgets the secret removed on b", || async {
        names(&a).await == ["pg"]
    })
    .await;
    let mut a = a;
    a.kill();
    let a_log = a.log.lock().unwrap().clone();
    let a = Node::launch_env(root.path(), "a", &a.gossip, &[&b], SECRET, &[], &debug);
    eventually("a, restarted, sees b again", || async {
        a.peer_ids().await == ["b"] && b.peer_ids().await == ["a"]
    })
    .await;
    assert_eq!(password(&a).await.as_deref(), Some(ROTATED));
    assert_eq!(names(&a).await, ["pg"]);
    assert_eq!(names(&b).await, ["pg"]);

    // What passed through the relay: each datagram opens with the cluster
    // secret, some carry the secrets, none a plain value.
    task.abort();
    let _ = task.await;
    let captured = captured.lock().unwrap().clone();
    let keyring = Keyring::new(Secret::new(SECRET).unwrap(), None);
    let mut guard = ReplayGuard::default();
    let (mut opened, mut carrying) = (0, 0);
    for (_, mut datagram) in captured {
        assert!(!contains(&datagram, FIRST) && !contains(&datagram, SPARE));
        let message = open_datagram(&keyring, &mut guard, unix_ms(), &mut datagram)
            .expect("a captured datagram opens with the cluster secret")
            .plaintext
            .to_vec();
        let envelope = ChitchatEnvelope::deserialize(&mut &message[..])
            .expect("an opened datagram holds a chitchat message");
        let decoded = format!("{:?}", envelope.message);
        opened += 1;
        if decoded.contains("secret:pg") {
            carrying += 1;
        }
        for value in [FIRST, ROTATED, SPARE] {
            assert!(!decoded.contains(value), "a gossip message holds {value}");
        }
    }
    assert!(carrying >= 1, "none of {opened} messages carried secret:pg");

    let mut found = files_holding(&root.path().join("a"), &[FIRST, ROTATED, SPARE]);
    found.extend(files_holding(
        &root.path().join("b"),
        &[FIRST, ROTATED, SPARE],
    ));
    assert!(found.is_empty(), "{found:?}");
    let logs = [
        a_log,
        a.log.lock().unwrap().clone(),
        b.log.lock().unwrap().clone(),
    ];
    assert!(logs.iter().all(|log| log.len() > 10), "the hosts logged");
    for line in logs.iter().flatten() {
        for value in [FIRST, ROTATED, SPARE] {
            assert!(!line.contains(value), "a log line holds a secret: {line}");
        }
    }
    println!("{opened} datagrams opened, {carrying} carried secret:pg, none a plain value");
}

/// A free UDP port for gossip.
fn free_gossip() -> String {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string()
}

/// How many secrets and tokens `node` gossips for the cluster.
async fn custody(node: &Node) -> (f64, f64) {
    let metrics = node.metrics().await;
    (
        common::series_sum(&metrics, "lichen_gossip_custody{kind=\"secret\"}"),
        common::series_sum(&metrics, "lichen_gossip_custody{kind=\"token\"}"),
    )
}

/// A secret and a token travel in one copy: gossiped by the host that
/// made them, not by every host that applied them (a secret may be 32
/// MiB); when that host is gone, one other host (the lowest node id) takes
/// them over, and a host that joins afterwards learns them from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_is_gossiped_by_one_host_and_outlives_the_host_that_set_it() {
    let root = tempfile::tempdir().unwrap();
    let (mut a, b, c) = super::three(root.path()).await;
    let set = a
        .admin(Method::PUT, "/v1/secrets/pg", FIRST.as_bytes().to_vec())
        .await;
    assert_eq!(set.status, StatusCode::CREATED, "{}", set.text());
    let made = a
        .admin(
            Method::POST,
            "/v1/tokens",
            br#"{"name": "ci", "scopes": ["status:read"]}"#.to_vec(),
        )
        .await;
    assert_eq!(made.status, StatusCode::CREATED, "{}", made.text());
    for node in [&b, &c] {
        eventually(&format!("{} holds pg and the token", node.id), || async {
            let tokens = node.admin(Method::GET, "/v1/tokens", Vec::new()).await;
            names(node).await == ["pg"] && tokens.text().contains("\"ci\"")
        })
        .await;
    }
    eventually("only a gossips pg and the token", || async {
        custody(&a).await == (1.0, 1.0)
            && custody(&b).await == (0.0, 0.0)
            && custody(&c).await == (0.0, 0.0)
    })
    .await;
    // And it stays so.
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    assert_eq!(custody(&b).await, (0.0, 0.0));
    assert_eq!(custody(&c).await, (0.0, 0.0));

    a.kill();
    eventually(
        "b, the lowest id left, takes pg and the token over",
        || async { custody(&b).await == (1.0, 1.0) && custody(&c).await == (0.0, 0.0) },
    )
    .await;
    let d = Node::start(root.path(), "d", &[&c], SECRET);
    eventually(
        "d, joining after a is gone, learns pg and the token",
        || async {
            let tokens = d.admin(Method::GET, "/v1/tokens", Vec::new()).await;
            names(&d).await == ["pg"] && tokens.text().contains("\"ci\"")
        },
    )
    .await;
    assert_eq!(custody(&d).await, (0.0, 0.0));
}
