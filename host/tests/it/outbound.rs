//! Guests' outbound HTTP through a real upstream on loopback: connections
//! pooled per function and capped by `[outbound] max_connections`, and the
//! address fence, with names pinned by the test (`--resolve`) so it
//! controls what they resolve to.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::{TestHost, component, test_config, write_policy};
use http::StatusCode;
use http_body_util::Full;

/// What the upstream saw.
#[derive(Default)]
struct Seen {
    connections: AtomicUsize,
    open: AtomicUsize,
    most_open: AtomicUsize,
    requests: AtomicUsize,
}

/// A loopback HTTP/1.1 server with keep-alive; `/slow` answers after 300 ms,
/// `/stall` only after [`common::PATIENCE`].
async fn upstream() -> (SocketAddr, Arc<Seen>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let counts = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counts.connections.fetch_add(1, Ordering::SeqCst);
            let open = counts.open.fetch_add(1, Ordering::SeqCst) + 1;
            counts.most_open.fetch_max(open, Ordering::SeqCst);
            let counts = Arc::clone(&counts);
            tokio::spawn(async move {
                let per_request = Arc::clone(&counts);
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        per_request.requests.fetch_add(1, Ordering::SeqCst);
                        async move {
                            match req.uri().path() {
                                "/slow" => tokio::time::sleep(Duration::from_millis(300)).await,
                                "/stall" => tokio::time::sleep(common::PATIENCE).await,
                                _ => {}
                            }
                            Ok::<_, Infallible>(hyper::Response::new(Full::new(
                                Bytes::from_static(b"upstream says hi"),
                            )))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
                counts.open.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    (addr, seen)
}

async fn fetch(host: &TestHost, function: &str, url: &str) -> common::Reply {
    host.get(&format!("/fn/{function}/fetch?url={url}")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_pooled_per_function_and_capped() {
    let (addr, seen) = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let policy = format!(
        "[outbound]\nallow = [\"http://127.0.0.1:{}\"]\nmax_connections = 2\n",
        addr.port()
    );
    write_policy(dir.path(), "a", &policy);
    write_policy(dir.path(), "b", &policy);
    let host = common::host_with(dir.path(), &[("a", "probe"), ("b", "probe")]).await;

    for _ in 0..20 {
        let reply = fetch(&host, "a", &format!("http://{addr}/x")).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(reply.json()["body"], "upstream says hi");
    }
    assert_eq!(seen.requests.load(Ordering::SeqCst), 20);
    assert_eq!(
        seen.connections.load(Ordering::SeqCst),
        1,
        "20 calls in a row share one kept-alive connection"
    );
    // Another function never shares a's connections.
    let reply = fetch(&host, "b", &format!("http://{addr}/x")).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(seen.connections.load(Ordering::SeqCst), 2);

    // Six slow calls at once: never more than two connections of a's.
    seen.most_open
        .store(seen.open.load(Ordering::SeqCst), Ordering::SeqCst);
    let calls: Vec<_> = (0..6)
        .map(|_| {
            let url = format!("{}/fn/a/fetch?url=http://{addr}/slow", host.url);
            tokio::spawn(
                async move { common::send(http::Method::GET, &url, &[], Vec::new()).await },
            )
        })
        .collect();
    for call in calls {
        let reply = call.await.unwrap();
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    }
    // b's idle connection is open too.
    assert!(
        seen.most_open.load(Ordering::SeqCst) <= 3,
        "{}",
        seen.most_open.load(Ordering::SeqCst)
    );
    let metrics = host.get("/metrics").await.text();
    assert!(
        metrics.contains("lichen_outbound_requests_total{function=\"a\",outcome=\"ok\"} 26"),
        "{metrics}"
    );
    assert!(
        metrics.contains("lichen_outbound_connections{function=\"a\"} 2"),
        "{metrics}"
    );
    host.stop().await;
}

/// A name that resolves to an internal address is refused unless the
/// policy names the address (or a range holding it); the address checked
/// is the one connected to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_addresses_are_reached_only_when_the_policy_names_them() {
    let (addr, seen) = upstream().await;
    let port = addr.port();
    let dir = tempfile::tempdir().unwrap();
    write_policy(
        dir.path(),
        "by-name",
        &format!(
            "[outbound]\nallow = [\"http://internal.test:{port}\", \"http://metadata.test:*\"]\n"
        ),
    );
    write_policy(
        dir.path(),
        "by-address",
        &format!(
            "[outbound]\nallow = [\"http://internal.test:{port}\", \"http://127.0.0.1:{port}\"]\n"
        ),
    );
    write_policy(
        dir.path(),
        "by-range",
        "[outbound]\nallow = [\"http://internal.test:*\", \"http://127.0.0.0/8:*\"]\n",
    );
    let mut config = test_config(dir.path());
    config
        .outbound
        .pinned
        .insert("internal.test".into(), vec!["127.0.0.1".parse().unwrap()]);
    config.outbound.pinned.insert(
        "metadata.test".into(),
        vec!["169.254.169.254".parse().unwrap()],
    );
    let host = TestHost::start(config).await;
    for name in ["by-name", "by-address", "by-range"] {
        let deployed = host.deploy(name, component("probe")).await;
        assert_eq!(deployed.status, StatusCode::CREATED, "{}", deployed.text());
    }

    for url in [
        format!("http://internal.test:{port}/x"),
        "http://metadata.test/latest/meta-data/".to_string(),
    ] {
        let refused = fetch(&host, "by-name", &url).await;
        assert_eq!(
            refused.status,
            StatusCode::BAD_GATEWAY,
            "{}",
            refused.text()
        );
        assert!(
            refused.text().contains("DestinationIpProhibited"),
            "{}",
            refused.text()
        );
    }
    assert_eq!(
        seen.requests.load(Ordering::SeqCst),
        0,
        "the fence let a request through"
    );

    for name in ["by-address", "by-range"] {
        let reply = fetch(&host, name, &format!("http://internal.test:{port}/x")).await;
        assert_eq!(reply.status, StatusCode::OK, "{name}: {}", reply.text());
    }
    assert_eq!(seen.requests.load(Ordering::SeqCst), 2);
    let metrics = host.get("/metrics").await.text();
    assert!(
        metrics
            .contains("lichen_outbound_requests_total{function=\"by-name\",outcome=\"refused\"} 2"),
        "{metrics}"
    );
    host.stop().await;
}

/// `[outbound] timeout` bounds connecting plus the response head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upstream_meets_the_outbound_timeout() {
    let (addr, _seen) = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    write_policy(
        dir.path(),
        "a",
        &format!(
            "[outbound]\nallow = [\"http://127.0.0.1:{}\"]\ntimeout = \"100ms\"\n",
            addr.port()
        ),
    );
    let host = common::host_with(dir.path(), &[("a", "probe")]).await;
    let slow = fetch(&host, "a", &format!("http://{addr}/stall")).await;
    assert_eq!(slow.status, StatusCode::BAD_GATEWAY, "{}", slow.text());
    assert!(slow.text().contains("ConnectionTimeout"), "{}", slow.text());
    let quick = fetch(&host, "a", &format!("http://{addr}/x")).await;
    assert_eq!(quick.status, StatusCode::OK, "{}", quick.text());
    let metrics = host.get("/metrics").await.text();
    assert!(
        metrics.contains("lichen_outbound_requests_total{function=\"a\",outcome=\"timeout\"} 1"),
        "{metrics}"
    );
    host.stop().await;
}

/// A loopback HTTPS server with a certificate for `upstream.test` from `ca`.
async fn tls_upstream(ca: &common::Ca) -> SocketAddr {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let (cert, key) = ca.leaf(&["upstream.test"], "upstream", false);
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let service = hyper::service::service_fn(|_req| async {
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(
                        b"secure hello",
                    ))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    addr
}

/// Outbound HTTPS checks the server's certificate: against a private CA
/// only with `--outbound-ca`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_https_trusts_a_private_ca_only_when_given() {
    let ca = common::Ca::new();
    let addr = tls_upstream(&ca).await;
    let port = addr.port();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    for (name, trusted) in [("with-ca", true), ("without", false)] {
        let data = dir.path().join(name);
        write_policy(
            &data,
            "a",
            &format!(
                "[outbound]\nallow = [\"https://upstream.test:{port}\", \"https://127.0.0.1:{port}\"]\n"
            ),
        );
        let mut config = test_config(&data);
        config
            .outbound
            .pinned
            .insert("upstream.test".into(), vec!["127.0.0.1".parse().unwrap()]);
        if trusted {
            config.outbound.ca_cert = Some(ca_file.clone());
        }
        let host = TestHost::start(config).await;
        let deployed = host.deploy("a", component("probe")).await;
        assert_eq!(deployed.status, StatusCode::CREATED, "{}", deployed.text());
        let reply = fetch(&host, "a", &format!("https://upstream.test:{port}/x")).await;
        if trusted {
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
            assert_eq!(reply.json()["body"], "secure hello");
        } else {
            assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{}", reply.text());
        }
        host.stop().await;
    }
}
