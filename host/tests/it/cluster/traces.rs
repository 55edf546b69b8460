//! Traces across hosts: a client request with a `traceparent` reaches host
//! `a`, which is full and forwards it to `b`, whose guest calls an upstream
//! over HTTP. A test OTLP receiver, decoding the real OTLP protobuf, gets
//! one trace holding both hosts' spans in the right parent order, and the
//! upstream sees the outbound span's `traceparent`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Full};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message;

use super::{Node, SECRET, SLOW_MS, deploy_with_policy, two_with};
use crate::common::{self, eventually, send};

/// A span as the receiver got it.
#[derive(Debug, Clone)]
struct Got {
    host: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
    start_ns: u64,
    end_ns: u64,
    attributes: HashMap<String, String>,
}

type Spans = Arc<Mutex<Vec<Got>>>;

/// An OTLP/HTTP receiver on loopback: decodes each `POST /v1/traces`.
async fn receiver() -> (SocketAddr, Spans) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let spans: Spans = Arc::default();
    let got = Arc::clone(&spans);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let got = Arc::clone(&got);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let got = Arc::clone(&got);
                        async move {
                            let path = req.uri().path().to_string();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            assert_eq!(path, "/v1/traces");
                            let export = ExportTraceServiceRequest::decode(body).unwrap();
                            got.lock().unwrap().extend(decode(&export));
                            Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::new())))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, spans)
}

fn decode(export: &ExportTraceServiceRequest) -> Vec<Got> {
    let text = |value: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>| match value
        .as_ref()
        .and_then(|v| v.value.as_ref())
    {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        other => format!("{other:?}"),
    };
    let mut spans = Vec::new();
    for resource in &export.resource_spans {
        let host = resource
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "service.instance.id")
            .map(|kv| text(&kv.value))
            .unwrap_or_default();
        for scope in &resource.scope_spans {
            for span in &scope.spans {
                spans.push(Got {
                    host: host.clone(),
                    name: span.name.clone(),
                    trace_id: hex::encode(&span.trace_id),
                    span_id: hex::encode(&span.span_id),
                    parent: hex::encode(&span.parent_span_id),
                    start_ns: span.start_time_unix_nano,
                    end_ns: span.end_time_unix_nano,
                    attributes: span
                        .attributes
                        .iter()
                        .map(|kv| (kv.key.clone(), text(&kv.value)))
                        .collect(),
                });
            }
        }
    }
    spans
}

/// An upstream that answers every request and keeps its `traceparent`s.
async fn upstream() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let headers = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let headers = Arc::clone(&headers);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        if let Some(parent) = req.headers().get("traceparent") {
                            headers
                                .lock()
                                .unwrap()
                                .push(parent.to_str().unwrap().to_string());
                        }
                        async {
                            Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from("up"))))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_request_is_one_trace_across_both_hosts() {
    let root = tempfile::tempdir().unwrap();
    let (collector, spans) = receiver().await;
    let (up, traceparents) = upstream().await;
    let endpoint = format!("http://{collector}");
    let flags = ["--otlp-endpoint", endpoint.as_str()];
    let (a, b) = two_with(root.path(), &flags).await;
    let policy =
        "[limits]\nconcurrency = 1\nqueue = 0\n\n[outbound]\nallow = [\"http://127.0.0.1:*\"]\n";
    deploy_with_policy(&a, &[&b], "probe", policy).await;
    eventually("a sees b serve probe", || a.sees_serving(1, "probe")).await;

    // a's one slot taken, so the traced call goes to b.
    let busy = format!("{}/fn/probe/sleep?ms={SLOW_MS}", a.url);
    let sleeper = tokio::spawn(async move { send(Method::GET, &busy, &[], Vec::new()).await });
    common::until_in_flight(&a.url, "probe", 1.0).await;
    let trace_id = "5b8aa5a2d2c872e8321cf37308d69df2";
    let client_span = "051581bf3cb55c13";
    let traceparent = format!("00-{trace_id}-{client_span}-01");
    let reply = send(
        Method::GET,
        &format!("{}/fn/probe/fetch?url=http://{up}/", a.url),
        &[("traceparent", &traceparent)],
        Vec::new(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.headers["x-lichen-served-by"], "b");
    assert_eq!(sleeper.await.unwrap().status, StatusCode::OK);

    let wanted = [
        ("a", "invoke probe"),
        ("a", "forward"),
        ("b", "invoke probe"),
        ("b", "guest"),
        ("b", "instantiate"),
        ("b", "outbound"),
    ];
    let trace = spans_of(&spans, trace_id, &wanted).await;
    let span = |host: &str, name: &str| -> Got {
        let found: Vec<&Got> = trace
            .iter()
            .filter(|s| s.host == host && s.name == name)
            .collect();
        assert_eq!(found.len(), 1, "{host} {name}: {trace:#?}");
        found[0].clone()
    };
    let a_invoke = span("a", "invoke probe");
    let a_forward = span("a", "forward");
    let b_invoke = span("b", "invoke probe");
    let b_guest = span("b", "guest");
    let b_outbound = span("b", "outbound");
    assert_eq!(a_invoke.parent, client_span);
    assert_eq!(a_forward.parent, a_invoke.span_id);
    assert_eq!(b_invoke.parent, a_forward.span_id);
    // b had a free slot: no wait, no admission span.
    assert!(!trace.iter().any(|s| s.name == "admission"), "{trace:#?}");
    assert_eq!(b_guest.parent, b_invoke.span_id);
    assert_eq!(span("b", "instantiate").parent, b_guest.span_id);
    assert_eq!(b_outbound.parent, b_guest.span_id);

    assert_eq!(a_invoke.attributes["lichen.outcome"], "forwarded");
    assert_eq!(a_forward.attributes["lichen.forwarded_to"], "b");
    assert_eq!(b_invoke.attributes["lichen.forwarded_from"], "a");
    assert_eq!(b_invoke.attributes["lichen.outcome"], "ok");
    assert_eq!(b_invoke.attributes["http.response.status_code"], "200");
    assert_eq!(b_invoke.attributes["lichen.instance"], "fresh");
    assert_eq!(b_outbound.attributes["http.response.status_code"], "200");
    println!("{}", drawing(&trace, client_span));

    // The upstream got the outbound span's context.
    let sent = format!("00-{trace_id}-{}-01", b_outbound.span_id);
    assert!(
        traceparents.lock().unwrap().contains(&sent),
        "{sent} not in {:?}",
        traceparents.lock().unwrap()
    );
}

/// The trace as a tree of spans with their times (the README's drawing).
fn drawing(trace: &[Got], root: &str) -> String {
    let start = trace.iter().map(|s| s.start_ns).min().unwrap_or(0);
    let mut out = String::new();
    fn walk(trace: &[Got], parent: &str, depth: usize, start: u64, out: &mut String) {
        let mut children: Vec<&Got> = trace.iter().filter(|s| s.parent == parent).collect();
        children.sort_by_key(|s| s.start_ns);
        for span in children {
            let at = (span.start_ns - start) as f64 / 1e6;
            let took = span.end_ns.saturating_sub(span.start_ns) as f64 / 1e6;
            out.push_str(&format!(
                "{:indent$}{} [{}] +{at:.1} ms, {took:.1} ms\n",
                "",
                span.name,
                span.host,
                indent = depth * 2
            ));
            walk(trace, &span.span_id, depth + 1, start, out);
        }
    }
    walk(trace, root, 0, start, &mut out);
    out
}

/// The spans of `trace_id` the collector has, once it has each of
/// `wanted` (host and name; the host `*` is any).
async fn spans_of(spans: &Spans, trace_id: &str, wanted: &[(&str, &str)]) -> Vec<Got> {
    let trace = || -> Vec<Got> {
        let spans = spans.lock().unwrap();
        spans
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect()
    };
    eventually("the collector has the spans", || async {
        let trace = trace();
        wanted.iter().all(|(host, name)| {
            trace
                .iter()
                .any(|s| (*host == "*" || s.host == *host) && s.name == *name)
        })
    })
    .await;
    trace()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_value_calls_map_items_and_a_wait_for_a_slot_are_spans_in_the_trace() {
    let root = tempfile::tempdir().unwrap();
    let (collector, spans) = receiver().await;
    let endpoint = format!("http://{collector}");
    let a = Node::start_with(
        root.path(),
        "a",
        &[],
        SECRET,
        &["--otlp-endpoint", &endpoint],
    );
    deploy_with_policy(&a, &[], "counter", "[keyvalue]\nstores = [\"default\"]\n").await;
    deploy_with_policy(&a, &[], "square", "").await;
    let policy = "[limits]\nconcurrency = 1\nqueue = 1\ntimeout = \"60s\"\n";
    deploy_with_policy(&a, &[], "probe", policy).await;

    let counted = "0af7651916cd43dd8448eb211c80319c";
    let reply = send(
        Method::GET,
        &format!("{}/fn/counter/page", a.url),
        &[("traceparent", &format!("00-{counted}-b7ad6b7169203331-01"))],
        Vec::new(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let trace = spans_of(&spans, counted, &[("*", "guest"), ("*", "keyvalue")]).await;
    let guest = trace.iter().find(|s| s.name == "guest").unwrap();
    let kv: Vec<&Got> = trace.iter().filter(|s| s.name == "keyvalue").collect();
    assert!(kv.iter().all(|s| s.parent == guest.span_id), "{trace:#?}");
    let ops: Vec<&str> = kv
        .iter()
        .map(|s| s.attributes["lichen.kv.op"].as_str())
        .collect();
    assert!(ops.contains(&"increment"), "{ops:?}");
    assert!(kv.iter().all(|s| s.attributes["lichen.kv.outcome"] == "ok"));

    let mapped = "4bf92f3577b34da6a3ce929d0e0e4736";
    let reply = send(
        Method::POST,
        &format!("{}/v1/functions/square/map", a.url),
        &[("traceparent", &format!("00-{mapped}-00f067aa0ba902b7-01"))],
        b"[1, 2, 3]".to_vec(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let trace = spans_of(
        &spans,
        mapped,
        &[("*", "map square"), ("*", "invoke square")],
    )
    .await;
    let map = trace.iter().find(|s| s.name == "map square").unwrap();
    assert_eq!(map.parent, "00f067aa0ba902b7");
    assert_eq!(map.attributes["lichen.items"], "3");
    eventually("each item is a child of the map", || async {
        let items = spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.name == "invoke square" && s.parent == map.span_id)
            .count();
        items == 3
    })
    .await;

    // probe's one slot taken: the traced call waits in the queue, and the
    // wait is its admission span.
    let busy = format!("{}/fn/probe/sleep?ms={SLOW_MS}", a.url);
    let sleeper = tokio::spawn(async move { send(Method::GET, &busy, &[], Vec::new()).await });
    common::until_in_flight(&a.url, "probe", 1.0).await;
    let queued = "1d6f1ab5b6ac4f7a8e5e3c36a41d2d0e";
    let reply = send(
        Method::GET,
        &format!("{}/fn/probe/", a.url),
        &[("traceparent", &format!("00-{queued}-2c7d1e6b8a9f0c34-01"))],
        Vec::new(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(sleeper.await.unwrap().status, StatusCode::OK);
    let trace = spans_of(&spans, queued, &[("a", "invoke probe"), ("a", "admission")]).await;
    let invoke = trace.iter().find(|s| s.name == "invoke probe").unwrap();
    let admission = trace.iter().find(|s| s.name == "admission").unwrap();
    assert_eq!(admission.parent, invoke.span_id);
    assert_eq!(admission.attributes["lichen.admission"], "admitted");
    assert!(admission.end_ns > admission.start_ns, "{admission:#?}");
}

/// A client cannot force tracing: with `--trace-sampling 0`, a client's
/// `traceparent` marked sampled is not recorded (the host's ratio
/// decides), unless the host trusts clients (`--trace-trust-client`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_sampled_flag_is_followed_only_when_the_host_trusts_it() {
    let root = tempfile::tempdir().unwrap();
    let (collector, spans) = receiver().await;
    let host = |name: &str, trust: bool| {
        let mut config = common::test_config(&root.path().join(name));
        config.trace = lichen::trace::TraceConfig {
            endpoint: Some(format!("http://{collector}")),
            headers: Vec::new(),
            sampling: 0.0,
            trust_client: trust,
        };
        config
    };
    let strict = common::TestHost::start(host("strict", false)).await;
    let trusting = common::TestHost::start(host("trusting", true)).await;
    for node in [&strict, &trusting] {
        let deployed = node.deploy("hello", common::component("hello")).await;
        assert_eq!(deployed.status, StatusCode::CREATED, "{}", deployed.text());
    }
    let forced = "4bf92f3577b34da6a3ce929d0e0e4736";
    let followed = "6e0c63257de34c92bf9efcd03927272e";
    for (node, trace_id) in [(&strict, forced), (&trusting, followed)] {
        let reply = send(
            Method::GET,
            &format!("{}/fn/hello/", node.url),
            &[("traceparent", &format!("00-{trace_id}-00f067aa0ba902b7-01"))],
            Vec::new(),
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    }
    // The trusting host exports its span: the collector works.
    spans_of(&spans, followed, &[("*", "invoke hello")]).await;
    // The strict host, stopped, has flushed everything it recorded: nothing
    // of the forced trace.
    strict.stop().await;
    let leaked: Vec<Got> = spans
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.trace_id == forced)
        .cloned()
        .collect();
    assert!(leaked.is_empty(), "{leaked:#?}");
    trusting.stop().await;
}
