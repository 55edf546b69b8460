//! Functions reached on their own domains: `[http] hosts` routes, over
//! HTTPS with a certificate per domain chosen by SNI (`--tls-dir`), checked
//! by a rustls client naming each domain.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};

use crate::common::{self, Ca, TestHost, test_config, tls_connect, write_policy};
use lichen::tls::TlsFiles;
use rustls::pki_types::pem::PemObject;

/// `GET path` with `Host: host` over a TLS connection that asked for `sni`;
/// the status, body and the certificate the server showed.
async fn get_as(
    ca: &Ca,
    addr: &str,
    sni: &str,
    host: &str,
    path: &str,
) -> (StatusCode, String, Vec<u8>) {
    let tls = tls_connect(ca, addr, sni, &[b"http/1.1"]).await.unwrap();
    let shown = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(connection);
    let request = Request::get(path)
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned(), shown)
}

/// Writes `NAME.crt` and `NAME.key` into `dir`; the certificate's DER.
fn pair(dir: &Path, name: &str, (cert, key): &(String, String)) -> Vec<u8> {
    std::fs::write(dir.join(format!("{name}.crt")), cert).unwrap();
    std::fs::write(dir.join(format!("{name}.key")), key).unwrap();
    rustls::pki_types::CertificateDer::from_pem_slice(cert.as_bytes())
        .unwrap()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_domains_reach_two_functions_each_with_its_own_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let ca = Ca::new();
    write_policy(&data, "shop", "[http]\nhosts = [\"shop.test\"]\n");
    write_policy(
        &data,
        "blog",
        "[http]\nhosts = [\"*.blog.test\"]\npath_prefix = \"/posts\"\n",
    );
    // Deployed over plain HTTP first; the TLS host finds them in the store.
    let plain = TestHost::start(test_config(&data)).await;
    for (name, fixture) in [("shop", "hello"), ("blog", "echo")] {
        let deployed = plain.deploy(name, common::component(fixture)).await;
        assert_eq!(deployed.status, StatusCode::CREATED, "{}", deployed.text());
    }
    // A second function claiming shop.test is refused, naming the holder;
    // blog's policy stays as it was.
    let refused = plain
        .admin(
            Method::PUT,
            "/v1/functions/blog/policy",
            b"[http]\nhosts = [\"shop.test\"]\n".to_vec(),
        )
        .await;
    refused.assert_error(StatusCode::BAD_REQUEST, "invalid_policy");
    assert!(
        refused.text().contains("the function shop's"),
        "{}",
        refused.text()
    );
    let listed = plain.admin(Method::GET, "/v1/routes", Vec::new()).await;
    assert_eq!(
        listed.json()["routes"],
        serde_json::json!([
            { "host": "*.blog.test", "path_prefix": "/posts", "function": "blog" },
            { "host": "shop.test", "path_prefix": "/", "function": "shop" },
        ]),
        "{}",
        listed.text()
    );
    plain.stop().await;

    let domains = dir.path().join("domains");
    std::fs::create_dir_all(&domains).unwrap();
    let default = pair(
        dir.path(),
        "default",
        &ca.leaf(&["localhost"], "default", false),
    );
    let shop = pair(
        &domains,
        "shop.test",
        &ca.leaf(&["shop.test"], "shop", false),
    );
    let blog = pair(
        &domains,
        "*.blog.test",
        &ca.leaf(&["*.blog.test"], "blog", false),
    );
    let mut config = test_config(&data);
    config.tls = Some(TlsFiles {
        cert: dir.path().join("default.crt"),
        key: dir.path().join("default.key"),
        dir: Some(domains.clone()),
        strict_sni: false,
        peers: None,
    });
    let host = TestHost::start(config).await;
    let addr = host.url.trim_start_matches("http://").to_string();

    // Each name: its certificate, its function, at the request's own path.
    let (status, body, shown) = get_as(&ca, &addr, "shop.test", "shop.test", "/cart").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, "Hello from Lichen!\n");
    assert_eq!(shown, shop);
    let (status, body, shown) = get_as(
        &ca,
        &addr,
        "www.blog.test",
        "www.blog.test:443",
        "/posts/7?x=1",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let echoed: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(echoed["path"], "/posts/7", "{echoed}");
    assert_eq!(echoed["authority"], "www.blog.test:443", "{echoed}");
    assert_eq!(shown, blog);
    // Outside blog's path prefix: no function, a 404 that says why.
    let (status, body, _) = get_as(&ca, &addr, "www.blog.test", "www.blog.test", "/about").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert!(body.contains("www.blog.test"), "{body}");
    // An unknown name: the default certificate, and a 404 with a message.
    let (status, body, shown) = get_as(&ca, &addr, "localhost", "nobody.test", "/").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert!(body.contains("nobody.test"), "{body}");
    assert_eq!(shown, default);
    // A pair added to the directory is served without a restart.
    let added = pair(&domains, "new.test", &ca.leaf(&["new.test"], "new", false));
    common::eventually("the new domain's certificate is served", || async {
        match tls_connect(&ca, &addr, "new.test", &[b"http/1.1"]).await {
            Ok(tls) => tls.get_ref().1.peer_certificates().unwrap()[0].as_ref() == added.as_slice(),
            Err(_) => false,
        }
    })
    .await;
    // /fn/ still works, on any name the routes do not claim.
    let (status, body, _) = get_as(&ca, &addr, "localhost", "localhost", "/fn/shop/").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, "Hello from Lichen!\n");

    host.stop().await;

    // With --tls-strict-sni an unknown name fails the handshake.
    let mut config = test_config(&data);
    config.tls = Some(TlsFiles {
        cert: dir.path().join("default.crt"),
        key: dir.path().join("default.key"),
        dir: Some(domains),
        strict_sni: true,
        peers: None,
    });
    let host = TestHost::start(config).await;
    let addr = host.url.trim_start_matches("http://").to_string();
    assert!(
        tls_connect(&ca, &addr, "localhost", &[b"http/1.1"])
            .await
            .is_err()
    );
    let (status, _, shown) = get_as(&ca, &addr, "shop.test", "shop.test", "/").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(shown, shop);
    host.stop().await;
}

/// A name a function claims cannot take the host: `/v1`, `/internal`,
/// `/metrics`, health, the status page and the OpenAPI document are the
/// host's on every name; address literals and `localhost` cannot be
/// claimed; the `Authorization` header reaches the guest only if its
/// policy opts in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claimed_name_never_shadows_the_host_or_hears_its_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_policy(&data, "echo", "[http]\nhosts = [\"shop.test\"]\n");
    let host = TestHost::start(test_config(&data)).await;
    let deployed = host.deploy("echo", common::component("echo")).await;
    assert_eq!(deployed.status, StatusCode::CREATED, "{}", deployed.text());
    let bearer = format!("Bearer {}", host.token);
    let as_shop = |path: &str, auth: bool| {
        let url = format!("{}{path}", host.url);
        let bearer = bearer.clone();
        async move {
            let mut headers = vec![("host", "shop.test")];
            if auth {
                headers.push(("authorization", bearer.as_str()));
            }
            common::send(Method::GET, &url, &headers, Vec::new()).await
        }
    };
    // The function answers its name...
    let echoed = as_shop("/cart", true).await;
    assert_eq!(echoed.status, StatusCode::OK, "{}", echoed.text());
    assert!(echoed.text().contains("/cart"), "{}", echoed.text());
    // ...without the admin's token.
    assert!(
        !echoed.text().to_ascii_lowercase().contains("authorization")
            && !echoed.text().contains(&host.token),
        "{}",
        echoed.text()
    );
    // The host's own paths stay the host's.
    let listed = as_shop("/v1/functions", true).await;
    assert_eq!(listed.status, StatusCode::OK, "{}", listed.text());
    assert!(listed.json()["functions"].is_array(), "{}", listed.text());
    for path in ["/healthz", "/readyz", "/openapi.json", "/metrics", "/ui"] {
        let own = as_shop(path, false).await;
        assert!(
            !own.text().contains("\"headers\""),
            "{path} reached the function: {}",
            own.text()
        );
    }
    let internal = as_shop("/internal/modules/00", false).await;
    assert!(
        !internal.text().contains("\"headers\""),
        "{}",
        internal.text()
    );
    // The host's own names cannot be claimed, by anyone.
    for name in ["127.0.0.1", "10.0.0.1", "localhost", "api.localhost"] {
        let claimed = host
            .admin(
                Method::PUT,
                "/v1/functions/echo/policy",
                format!("[http]\nhosts = [\"{name}\"]\n").into_bytes(),
            )
            .await;
        claimed.assert_error(StatusCode::BAD_REQUEST, "invalid_policy");
        assert!(
            claimed.text().contains("cannot be claimed"),
            "{}",
            claimed.text()
        );
    }
    // A policy that opts in hands the header on: the function's own
    // token, never the admin token.
    let opted = host
        .admin(
            Method::PUT,
            "/v1/functions/echo/policy",
            b"[http]\nhosts = [\"shop.test\"]\n[access]\npublic = false\ntokens = [\"shop-caller\"]\npass_authorization = true\n".to_vec(),
        )
        .await;
    assert_eq!(opted.status, StatusCode::OK, "{}", opted.text());
    let echoed = as_shop("/cart", true).await;
    assert_eq!(echoed.status, StatusCode::OK, "{}", echoed.text());
    assert!(!echoed.text().contains(&host.token), "{}", echoed.text());
    let own = common::send(
        Method::GET,
        &format!("{}/cart", host.url),
        &[
            ("host", "shop.test"),
            ("authorization", "Bearer shop-caller"),
        ],
        Vec::new(),
    )
    .await;
    assert!(own.text().contains("shop-caller"), "{}", own.text());
    host.stop().await;
}
