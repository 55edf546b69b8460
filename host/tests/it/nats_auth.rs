//! The NATS plane authenticated: a host reaches a `nats-server` that
//! demands an nkey and a client certificate (and shows its own, from a
//! private CA) only with all three given (`--kv-nats-nkey`,
//! `--kv-nats-cert`/`--kv-nats-key`, `--kv-nats-ca`); missing any one, its
//! functions' stores fail and it is not ready.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use http::StatusCode;
use lichen::kv::nats::NatsAuth;
use lichen::server::KvConfig;

use crate::common::{
    Ca, PATIENCE, Spawned, TestHost, component, eventually, nats_server_bin, test_config,
    write_policy,
};

/// A nats-server on a free loopback port with JetStream, TLS that verifies
/// clients against `ca`, and one user: the nkey `user`.
fn secured_nats(dir: &Path, ca: &Ca, user: &str) -> (Spawned, String) {
    std::fs::create_dir_all(dir).unwrap();
    let (cert, key) = ca.leaf(&["127.0.0.1"], "nats", false);
    std::fs::write(dir.join("server.crt"), cert).unwrap();
    std::fs::write(dir.join("server.key"), key).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let conf = format!(
        "listen: \"127.0.0.1:{port}\"\njetstream {{ store_dir: {:?} }}\nauthorization {{ users = [ {{ nkey: {user:?} }} ] }}\ntls {{ cert_file: {:?}, key_file: {:?}, ca_file: {:?}, verify: true }}\n",
        dir.join("js").display().to_string(),
        dir.join("server.crt").display().to_string(),
        dir.join("server.key").display().to_string(),
        dir.join("ca.pem").display().to_string(),
    );
    std::fs::write(dir.join("nats.conf"), conf).unwrap();
    let child = std::process::Command::new(nats_server_bin())
        .arg("--config")
        .arg(dir.join("nats.conf"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map(Spawned::new)
        .unwrap();
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(started.elapsed() < PATIENCE, "nats-server never listened");
        std::thread::sleep(Duration::from_millis(50));
    }
    (child, format!("nats://127.0.0.1:{port}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_reaches_nats_only_with_its_credentials_and_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let ca = Ca::new();
    let user = nkeys::KeyPair::new_user();
    let (_nats, url) = secured_nats(&root.join("nats"), &ca, &user.public_key());
    std::fs::write(root.join("user.nk"), user.seed().unwrap()).unwrap();
    let (cert, key) = ca.leaf(&["lichen"], "lichen", false);
    std::fs::write(root.join("client.crt"), cert).unwrap();
    std::fs::write(root.join("client.key"), key).unwrap();
    std::fs::write(root.join("ca.pem"), ca.pem()).unwrap();
    let full = NatsAuth {
        creds: None,
        nkey: Some(root.join("user.nk")),
        ca: Some(root.join("ca.pem")),
        cert: Some(root.join("client.crt")),
        key: Some(root.join("client.key")),
    };
    let start = |name: &str, auth: NatsAuth| {
        let data = root.join(name);
        write_policy(&data, "counter", "[keyvalue]\nstores = [\"default\"]\n");
        let mut config = test_config(&data);
        config.kv = KvConfig::Nats {
            urls: vec![url.clone()],
            replicas: 1,
            timeout: Duration::from_secs(5),
        };
        config.kv_nats_auth = auth;
        TestHost::start(config)
    };
    let trusted = start("trusted", full.clone()).await;
    let deployed = trusted.deploy("counter", component("counter")).await;
    assert_eq!(deployed.status, StatusCode::CREATED, "{}", deployed.text());
    eventually("the trusted host counts through NATS", || async {
        trusted.get("/fn/counter/c").await.status == StatusCode::OK
    })
    .await;
    assert_eq!(trusted.get("/readyz").await.status, StatusCode::OK);

    for (name, auth) in [
        (
            "no-nkey",
            NatsAuth {
                nkey: None,
                ..full.clone()
            },
        ),
        (
            "no-certificate",
            NatsAuth {
                cert: None,
                key: None,
                ..full.clone()
            },
        ),
        (
            "no-ca",
            NatsAuth {
                ca: None,
                ..full.clone()
            },
        ),
    ] {
        let host = start(name, auth).await;
        let deployed = host.deploy("counter", component("counter")).await;
        assert_eq!(deployed.status, StatusCode::CREATED, "{}", deployed.text());
        let counted = host.get("/fn/counter/c").await;
        assert_ne!(counted.status, StatusCode::OK, "{name}: {}", counted.text());
        assert_ne!(host.get("/readyz").await.status, StatusCode::OK, "{name}");
        host.stop().await;
    }
    // The trusted host's count went on undisturbed.
    let counted = trusted.get("/fn/counter/c").await;
    assert_eq!(counted.status, StatusCode::OK, "{}", counted.text());
    trusted.stop().await;
}
