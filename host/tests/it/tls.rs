//! TLS for clients: a CA and certificates made by the test (rcgen), real
//! handshakes over HTTP/1.1 and HTTP/2, the CLI client trusting a private
//! CA, a certificate rotated under load, and what a client refuses.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use common::{
    Ca, PATIENCE, TestHost, test_config, tls_connect as connect, tls_get as get, write_policy,
};
use http::StatusCode;
use http_body::Frame;
use lichen::tls::TlsFiles;

const LICHEN: &str = env!("CARGO_BIN_EXE_lichen");

/// Writes a pair to `dir/tls.crt` and `dir/tls.key` (by rename, as
/// certificate tools do).
fn install(dir: &Path, (cert, key): &(String, String)) -> TlsFiles {
    let files = TlsFiles::pair(dir.join("tls.crt"), dir.join("tls.key"));
    for (path, text) in [(&files.key, key), (&files.cert, cert)] {
        let tmp = path.with_extension("new");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }
    files
}

fn served_cert(tls: &tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> Vec<u8> {
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn addr(host: &TestHost) -> String {
    host.url.trim_start_matches("http://").to_string()
}

/// `lichen ls` against the host over HTTPS; its success and output.
fn cli_ls(url: &str, ca_cert: Option<&PathBuf>) -> (bool, String) {
    let mut command = Command::new(LICHEN);
    command
        .args(["ls", "--url", url, "--token", "test-token"])
        .env_remove("LICHEN_ADMIN_TOKEN");
    if let Some(ca) = ca_cert {
        command.arg("--ca-cert").arg(ca);
    }
    let output = command.output().unwrap();
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_over_http1_and_http2_and_the_cli_trusts_a_private_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let mut config = test_config(dir.path());
    config.tls = Some(install(
        dir.path(),
        &ca.leaf(&["127.0.0.1", "localhost"], "one", false),
    ));
    let host = TestHost::start(config).await;
    let addr = addr(&host);

    for alpn in [
        &[b"h2".as_slice()][..],
        &[b"http/1.1".as_slice()][..],
        &[][..],
    ] {
        let tls = connect(&ca, &addr, "localhost", alpn).await.unwrap();
        let negotiated = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        let expected = alpn.first().map(|p| p.to_vec());
        assert_eq!(negotiated, expected);
        let (status, body) = get(tls, "/healthz").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(&body[..], b"ok\n");
    }
    // Plain HTTP on a TLS port gets no answer.
    let plain = tokio::time::timeout(
        Duration::from_secs(10),
        common::try_send(
            http::Method::GET,
            &format!("http://{addr}/healthz"),
            Vec::new(),
        ),
    )
    .await
    .unwrap();
    assert!(plain.is_none_or(|r| r.status != StatusCode::OK));

    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let url = format!("https://{addr}");
    let (ok, out) = cli_ls(&url, Some(&ca_file));
    assert!(ok, "{out}");
    assert!(out.contains("NAME"), "{out}");
    let (ok, out) = cli_ls(&url, None);
    assert!(
        !ok,
        "a private CA must not be trusted without --ca-cert: {out}"
    );
    assert!(out.contains("TLS handshake failed"), "{out}");
    host.stop().await;
}

/// A POST over `tls` whose body is whatever is sent on the returned
/// channel until it is dropped; the task answers status and body.
async fn streamed_post(
    tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    path: &str,
) -> (
    tokio::sync::mpsc::Sender<Bytes>,
    tokio::task::JoinHandle<(StatusCode, Bytes)>,
) {
    use futures::StreamExt;
    use http_body_util::BodyExt;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let frames =
        common::stream_of(rx).map(|chunk| Ok::<_, std::convert::Infallible>(Frame::data(chunk)));
    let body = http_body_util::StreamBody::new(frames);
    let request = http::Request::post(format!("https://localhost{path}"))
        .header("host", "localhost")
        .body(body)
        .unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(connection);
    let task = tokio::spawn(async move {
        let response = sender.send_request(request).await.unwrap();
        let status = response.status();
        (
            status,
            response.into_body().collect().await.unwrap().to_bytes(),
        )
    });
    (tx, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_is_picked_up_and_a_bad_one_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    write_policy(dir.path(), "echo", "[limits]\ntimeout = \"5m\"\n");
    // Deployed over plain HTTP first; the TLS host finds it in the store.
    let plain = TestHost::start(test_config(dir.path())).await;
    let deployed = plain.deploy("echo", common::component("echo")).await;
    assert_eq!(deployed.status, StatusCode::CREATED, "{}", deployed.text());
    plain.stop().await;
    let mut config = test_config(dir.path());
    config.tls = Some(install(
        dir.path(),
        &ca.leaf(&["localhost"], "first", false),
    ));
    // The request in flight below waits on its client as long as it takes.
    config.body_idle_timeout = PATIENCE;
    let host = TestHost::start(config).await;
    let addr = addr(&host);

    let first = connect(&ca, &addr, "localhost", &[b"http/1.1"])
        .await
        .unwrap();
    let first_cert = served_cert(&first);
    // A request in flight across the rotation: its body comes in two
    // parts, the second only once the new certificate is served.
    let (body, in_flight) = streamed_post(first, "/fn/echo").await;
    body.send(Bytes::from_static(b"before ")).await.unwrap();
    let metric = |series: &'static str| {
        let (ca, addr) = (&ca, &addr);
        async move {
            let tls = connect(ca, addr, "localhost", &[]).await.unwrap();
            let (_, metrics) = get(tls, "/metrics").await;
            common::series_sum(&String::from_utf8_lossy(&metrics), series)
        }
    };
    common::eventually("the echo call is in flight", || async {
        metric("lichen_inflight{function=\"echo\"}").await >= 1.0
    })
    .await;
    install(dir.path(), &ca.leaf(&["localhost"], "second", false));
    let started = std::time::Instant::now();
    let rotated = loop {
        let tls = connect(&ca, &addr, "localhost", &[]).await.unwrap();
        let served = served_cert(&tls);
        if served != first_cert {
            break served;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "the new certificate is not served within {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    body.send(Bytes::from_static(b"after")).await.unwrap();
    drop(body);
    let (status, echoed) = in_flight.await.unwrap();
    assert_eq!(status, StatusCode::OK, "the request in flight finished");
    let echoed: serde_json::Value = serde_json::from_slice(&echoed).unwrap();
    assert_eq!(echoed["body"], "before after");

    // A key that does not go with its certificate: the previous pair stays.
    let (cert, _) = ca.leaf(&["localhost"], "third", false);
    let (_, other_key) = ca.leaf(&["localhost"], "unrelated", false);
    install(dir.path(), &(cert, other_key));
    common::eventually("the bad pair is read and refused", || async {
        metric("lichen_tls_reloads_total{outcome=\"error\"}").await >= 1.0
    })
    .await;
    let tls = connect(&ca, &addr, "localhost", &[]).await.unwrap();
    assert_eq!(served_cert(&tls), rotated, "a bad pair replaced a good one");
    let (status, _) = get(tls, "/healthz").await;
    assert_eq!(status, StatusCode::OK);
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_misnamed_certificates_are_refused_by_clients() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    for (case, pair) in [
        ("expired", ca.leaf(&["127.0.0.1", "localhost"], "old", true)),
        ("misnamed", ca.leaf(&["other.example"], "other", false)),
    ] {
        let data = dir.path().join(case);
        std::fs::create_dir_all(&data).unwrap();
        let mut config = test_config(&data);
        config.tls = Some(install(&data, &pair));
        let host = TestHost::start(config).await;
        let addr = addr(&host);
        let error = connect(&ca, &addr, "localhost", &[]).await.err();
        assert!(error.is_some(), "{case}: the handshake succeeded");
        let (ok, out) = cli_ls(&format!("https://{addr}"), Some(&ca_file));
        assert!(!ok, "{case}: the CLI accepted it: {out}");
        host.stop().await;
    }
}
