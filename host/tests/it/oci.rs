//! Deploys from a real OCI registry (Debian's docker-registry on loopback):
//! by tag and by digest, the CNCF wasm layout and the older one, with and
//! without credentials; and every refusal with its status, nothing stored.
#![allow(clippy::unwrap_used)]

use crate::common;

use common::{OciRegistry, Reply, TestHost, component, send, test_config};
use http::{Method, StatusCode};
use lichen::oci::{RegistryConfig, WASM_LAYER_V1};

/// A host that may pull from `registries` (plain HTTP).
async fn host_for(dir: &std::path::Path, registries: &[&OciRegistry]) -> TestHost {
    host_with(dir, registries, |_| {}).await
}

async fn host_with(
    dir: &std::path::Path,
    registries: &[&OciRegistry],
    adjust: impl FnOnce(&mut lichen::server::ServeConfig),
) -> TestHost {
    let mut config = test_config(dir);
    let addresses: Vec<String> = registries.iter().map(|r| r.address.clone()).collect();
    config.registry = RegistryConfig {
        allowed: addresses.clone(),
        insecure: addresses,
        ..RegistryConfig::default()
    };
    adjust(&mut config);
    TestHost::start(config).await
}

async fn deploy_oci(host: &TestHost, name: &str, reference: &str) -> Reply {
    send(
        Method::PUT,
        &format!("{}/v1/functions/{name}", host.url),
        &[
            ("authorization", &format!("Bearer {}", host.token)),
            ("content-type", "application/json"),
        ],
        serde_json::to_vec(&serde_json::json!({ "oci": reference })).unwrap(),
    )
    .await
}

/// Refused with `status` and `code`, and nothing of `name` stored.
async fn assert_refused(host: &TestHost, name: &str, reply: Reply, status: StatusCode, code: &str) {
    reply.assert_error(status, code);
    let described = host
        .admin(Method::GET, &format!("/v1/functions/{name}"), Vec::new())
        .await;
    assert_eq!(described.status, StatusCode::NOT_FOUND, "{name} was stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn components_are_pulled_by_tag_and_by_digest() {
    let dir = tempfile::tempdir().unwrap();
    let registry = OciRegistry::start(&dir.path().join("registry"), None);
    let hello = component("hello");
    let pinned = registry.push_component("acme/hello", "1.0", &hello).await;
    let host = host_for(&dir.path().join("host"), &[&registry]).await;

    let by_tag = deploy_oci(
        &host,
        "hello",
        &format!("{}/acme/hello:1.0", registry.address),
    )
    .await;
    assert_eq!(by_tag.status, StatusCode::CREATED, "{}", by_tag.text());
    let sha = lichen::store::sha256_hex(&hello);
    assert_eq!(by_tag.json()["sha256"], sha.as_str());
    let (_, manifest) = pinned.split_once('@').unwrap();
    assert_eq!(by_tag.json()["oci"]["manifest_digest"], manifest);
    assert_eq!(
        by_tag.json()["oci"]["layer_digest"],
        format!("sha256:{sha}")
    );
    let answer = host.get("/fn/hello").await;
    assert_eq!(answer.text(), "Hello from Lichen!\n");

    // By digest, as another function; the version records where it came from.
    let by_digest = deploy_oci(&host, "pinned", &pinned).await;
    assert_eq!(
        by_digest.status,
        StatusCode::CREATED,
        "{}",
        by_digest.text()
    );
    let described = host
        .admin(Method::GET, "/v1/functions/pinned", Vec::new())
        .await
        .json();
    assert_eq!(
        described["versions"][0]["oci"]["reference"],
        pinned.as_str()
    );

    // The older single-layer layout.
    let echo = component("echo");
    let old = registry
        .push(
            "acme/echo",
            "v1",
            ("application/vnd.wasm.config.v1+json", b"{}"),
            &[(WASM_LAYER_V1, &echo)],
        )
        .await;
    let deployed = deploy_oci(&host, "echo", &old).await;
    assert_eq!(deployed.status, StatusCode::CREATED, "{}", deployed.text());

    // The CLI asks the host to pull.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_lichen"))
        .args(["deploy", "from-cli", "--oci", &pinned, "--url", &host.url])
        .args(["--token", &host.token])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(out.contains("deployed from-cli version "), "{out}");
    assert!(out.contains(manifest), "{out}");
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_with_basic_auth_needs_the_credentials_file() {
    let dir = tempfile::tempdir().unwrap();
    let registry = OciRegistry::start(&dir.path().join("registry"), Some(("alice", "s3cret-pass")));
    let reference = registry
        .push_component("private/hello", "1", &component("hello"))
        .await;

    let without = host_for(&dir.path().join("a"), &[&registry]).await;
    let refused = deploy_oci(&without, "hello", &reference).await;
    assert_refused(
        &without,
        "hello",
        refused,
        StatusCode::BAD_GATEWAY,
        "registry_unauthorized",
    )
    .await;
    without.stop().await;

    let auth_file = dir.path().join("config.json");
    let auth = base64_encode("alice:s3cret-pass");
    std::fs::write(
        &auth_file,
        format!(
            r#"{{"auths": {{"{}": {{"auth": "{auth}"}}}}}}"#,
            registry.address
        ),
    )
    .unwrap();
    let with = host_with(&dir.path().join("b"), &[&registry], |config| {
        config.registry.auth_file = Some(auth_file.clone());
    })
    .await;
    let deployed = deploy_oci(&with, "hello", &reference).await;
    assert_eq!(deployed.status, StatusCode::CREATED, "{}", deployed.text());
    with.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_references_and_artifacts_are_refused_and_nothing_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let registry = OciRegistry::start(&dir.path().join("registry"), None);
    let other = OciRegistry::start(&dir.path().join("other"), None);
    let hello = component("hello");
    let pinned = registry.push_component("acme/hello", "1", &hello).await;
    let tagged = format!("{}/acme/hello:1", registry.address);
    let host = host_with(&dir.path().join("host"), &[&registry], |config| {
        config.max_upload = 50_000;
    })
    .await;

    // Too large for this host: refused before the layer is pulled.
    let reply = deploy_oci(&host, "big", &pinned).await;
    assert_refused(
        &host,
        "big",
        reply,
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
    )
    .await;
    host.stop().await;

    let host = host_for(&dir.path().join("host2"), &[&registry]).await;
    // A digest the registry does not have.
    let (repo, _) = pinned.split_once('@').unwrap();
    let wrong = format!("{repo}@sha256:{}", "0".repeat(64));
    let reply = deploy_oci(&host, "wrong", &wrong).await;
    assert_refused(
        &host,
        "wrong",
        reply,
        StatusCode::NOT_FOUND,
        "oci_not_found",
    )
    .await;
    // A registry this host was not told it may use.
    let elsewhere = other.push_component("acme/hello", "1", &hello).await;
    let reply = deploy_oci(&host, "elsewhere", &elsewhere).await;
    assert_refused(
        &host,
        "elsewhere",
        reply,
        StatusCode::FORBIDDEN,
        "registry_not_allowed",
    )
    .await;
    // A container image and a Spin application are not components.
    let image = registry
        .push(
            "acme/server",
            "latest",
            ("application/vnd.oci.image.config.v1+json", b"{}"),
            &[(
                "application/vnd.oci.image.layer.v1.tar+gzip",
                b"not really a tarball",
            )],
        )
        .await;
    let reply = deploy_oci(&host, "image", &image).await;
    assert!(
        reply.text().contains("a container image"),
        "{}",
        reply.text()
    );
    assert_refused(
        &host,
        "image",
        reply,
        StatusCode::UNPROCESSABLE_ENTITY,
        "not_a_component_artifact",
    )
    .await;
    let spin = registry
        .push(
            "acme/spin-app",
            "1",
            ("application/vnd.fermyon.spin.application.v1+config", b"{}"),
            &[
                (WASM_LAYER_V1, &hello),
                ("application/vnd.wasm.content.bundle.v1.tar+gzip", b"assets"),
            ],
        )
        .await;
    let reply = deploy_oci(&host, "spin", &spin).await;
    assert!(
        reply.text().contains("Spin application"),
        "{}",
        reply.text()
    );
    assert_refused(
        &host,
        "spin",
        reply,
        StatusCode::UNPROCESSABLE_ENTITY,
        "not_a_component_artifact",
    )
    .await;
    // A pushed layer that is not a component fails validation as an upload would.
    let junk = registry
        .push_component("acme/junk", "1", b"not wasm at all")
        .await;
    let reply = deploy_oci(&host, "junk", &junk).await;
    assert_refused(
        &host,
        "junk",
        reply,
        StatusCode::UNPROCESSABLE_ENTITY,
        "not_wasm",
    )
    .await;
    // Bodies that are not a deploy request.
    for body in [r#"{"oci": 5}"#, r#"{"url": "x"}"#, "not json"] {
        let reply = send(
            Method::PUT,
            &format!("{}/v1/functions/odd", host.url),
            &[
                ("authorization", &format!("Bearer {}", host.token)),
                ("content-type", "application/json"),
            ],
            body.as_bytes().to_vec(),
        )
        .await;
        assert_refused(
            &host,
            "odd",
            reply,
            StatusCode::BAD_REQUEST,
            "invalid_deploy",
        )
        .await;
    }
    let reply = deploy_oci(&host, "odd", "not a reference!").await;
    assert_refused(
        &host,
        "odd",
        reply,
        StatusCode::BAD_REQUEST,
        "invalid_reference",
    )
    .await;
    host.stop().await;

    // --require-digest: a tag alone is refused, a pinned reference is not.
    let host = host_with(&dir.path().join("host3"), &[&registry], |config| {
        config.registry.require_digest = true;
    })
    .await;
    let reply = deploy_oci(&host, "tagged", &tagged).await;
    assert_refused(
        &host,
        "tagged",
        reply,
        StatusCode::BAD_REQUEST,
        "digest_required",
    )
    .await;
    assert_eq!(
        deploy_oci(&host, "pinned", &pinned).await.status,
        StatusCode::CREATED
    );
    host.stop().await;
}

fn base64_encode(text: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(text)
}
