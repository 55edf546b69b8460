//! Key-value state (`wasi:keyvalue`) through real guests on a real host:
//! the SDK examples (`counter`, `notes`), and `kv-draft`, which calls the
//! `0.2.0-draft` interface through its own wit-bindgen bindings, built for
//! WASIp2 and WASIp3. The store is the embedded one (redb) in the host's
//! data directory.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::sync::{Arc, Mutex};

use common::{TestHost, host_with, send, test_config, write_policy};
use http::{Method, StatusCode};

const GRANT_DEFAULT: &str = "[keyvalue]\nstores = [\"default\"]\n";

async fn call(host: &TestHost, function: &str, query: &str, body: &[u8]) -> common::Reply {
    send(
        Method::POST,
        &format!("{}/fn/{function}?{query}", host.url),
        &[],
        body.to_vec(),
    )
    .await
}

/// A `kv-draft` call expected to succeed; its JSON answer.
async fn ok(host: &TestHost, function: &str, query: &str, body: &[u8]) -> serde_json::Value {
    let reply = call(host, function, query, body).await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "{function}?{query}: {}",
        reply.text()
    );
    reply.json()
}

/// A `kv-draft` call expected to get the interface's error; its JSON.
async fn refused(host: &TestHost, function: &str, query: &str, body: &[u8]) -> serde_json::Value {
    let reply = call(host, function, query, body).await;
    assert_eq!(
        reply.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{function}?{query}: {}",
        reply.text()
    );
    reply.json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counter_and_notes_keep_their_state_across_requests_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    write_policy(dir.path(), "counter", GRANT_DEFAULT);
    write_policy(dir.path(), "notes", "[keyvalue]\nstores = [\"notes\"]\n");
    let host = host_with(dir.path(), &[("counter", "counter"), ("notes", "notes")]).await;
    for expected in 1..=3 {
        let reply = host.get("/fn/counter/a").await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(reply.json()["visits"], expected);
    }
    assert_eq!(host.get("/fn/counter/b").await.json()["visits"], 1);
    let put = send(
        Method::PUT,
        &format!("{}/fn/notes/todo", host.url),
        &[],
        br#"{"items":["soil","water"]}"#.to_vec(),
    )
    .await;
    assert_eq!(put.status, StatusCode::OK, "{}", put.text());
    let bad = send(
        Method::PUT,
        &format!("{}/fn/notes/bad", host.url),
        &[],
        b"not json".to_vec(),
    )
    .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST, "{}", bad.text());
    host.stop().await;

    let host = TestHost::start(test_config(dir.path())).await;
    assert_eq!(host.get("/fn/counter/a").await.json()["visits"], 4);
    let note = host.get("/fn/notes/todo").await;
    assert_eq!(note.status, StatusCode::OK, "{}", note.text());
    assert_eq!(note.json()["items"][1], "water");
    assert_eq!(
        host.get("/fn/notes/").await.json()["keys"],
        serde_json::json!(["todo"])
    );
    let gone = host.get("/fn/notes/missing").await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND, "{}", gone.text());
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counter_counts_exactly_under_32_concurrent_requests() {
    let dir = tempfile::tempdir().unwrap();
    write_policy(dir.path(), "counter", GRANT_DEFAULT);
    let host = host_with(dir.path(), &[("counter", "counter")]).await;
    let url = format!("{}/fn/counter/hits", host.url);
    let requests: Vec<_> = (0..32)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { send(Method::GET, &url, &[], Vec::new()).await })
        })
        .collect();
    let mut seen = Vec::new();
    for request in requests {
        let reply = request.await.unwrap();
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        seen.push(reply.json()["visits"].as_i64().unwrap());
    }
    seen.sort_unstable();
    assert_eq!(
        seen,
        (1..=32).collect::<Vec<i64>>(),
        "each count answered once"
    );
    assert_eq!(host.get("/fn/counter/hits").await.json()["visits"], 33);
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_are_granted_by_label_and_kept_apart_per_function() {
    let dir = tempfile::tempdir().unwrap();
    for function in ["a", "b", "c3"] {
        write_policy(dir.path(), function, GRANT_DEFAULT);
    }
    let host = host_with(
        dir.path(),
        &[
            ("a", "kv-draft"),
            ("b", "kv-draft"),
            ("c3", "kv-draft-p3"),
            ("none", "kv-draft"),
        ],
    )
    .await;
    ok(&host, "a", "op=set&key=k", b"from a").await;
    for other in ["b", "c3"] {
        let read = ok(&host, other, "op=get&key=k", b"").await;
        assert_eq!(
            read["value"],
            serde_json::Value::Null,
            "{other} sees a's key"
        );
        ok(
            &host,
            other,
            "op=set&key=k",
            format!("from {other}").as_bytes(),
        )
        .await;
    }
    assert_eq!(ok(&host, "a", "op=get&key=k", b"").await["value"], "from a");
    assert_eq!(
        ok(&host, "c3", "op=get&key=k", b"").await["value"],
        "from c3"
    );

    // A label the policy does not list, and a policy with no [keyvalue].
    for (function, query) in [
        ("a", "op=get&key=k&store=sessions"),
        ("c3", "op=get&key=k&store=sessions"),
        ("none", "op=get&key=k"),
    ] {
        let denied = refused(&host, function, query, b"").await;
        assert_eq!(denied["error"], "access-denied", "{function}?{query}");
    }

    // The draft's numbered cursor: a count of keys to skip.
    ok(&host, "a", "op=set-many&keys=k2,k3", b"v").await;
    let all = ok(&host, "a", "op=list", b"").await;
    assert_eq!(all["keys"], serde_json::json!(["k", "k2", "k3"]));
    assert_eq!(all["cursor"], serde_json::Value::Null);
    let rest = ok(&host, "a", "op=list&cursor=1", b"").await;
    assert_eq!(rest["keys"], serde_json::json!(["k2", "k3"]));
    let found = ok(&host, "a", "op=get-many&keys=k2,nope", b"").await;
    assert_eq!(found["found"], serde_json::json!([["k2", "v"], null]));
    ok(&host, "a", "op=delete-many&keys=k2,k3", b"").await;
    assert_eq!(
        ok(&host, "a", "op=exists&key=k2", b"").await["exists"],
        false
    );
    host.stop().await;
}

/// Each policy limit, met by a guest: refused with the interface's error,
/// the message naming the limit, and what was stored is kept.
async fn limits_refuse_by_name_and_keep_what_is_stored(fixture: &str) {
    let dir = tempfile::tempdir().unwrap();
    write_policy(
        dir.path(),
        "kv",
        "[keyvalue]\nstores = [\"default\"]\nmax_key_bytes = 16\nmax_value_bytes = 64\n\
         max_keys = 3\nmax_bytes = 150\nmax_ops = 10\n",
    );
    let host = host_with(dir.path(), &[("kv", fixture)]).await;
    let says = |answer: serde_json::Value, limit: &str| {
        assert_eq!(answer["error"], "other", "{answer}");
        let message = answer["message"].as_str().unwrap_or_default().to_string();
        assert!(message.contains(limit), "{limit}: {message}");
    };
    ok(&host, "kv", "op=set&key=k1", b"v").await;
    says(
        refused(&host, "kv", &format!("op=set&key={}", "k".repeat(17)), b"v").await,
        "max_key_bytes",
    );
    says(
        refused(&host, "kv", "op=set&key=k2", &[b'x'; 65]).await,
        "max_value_bytes",
    );
    ok(&host, "kv", "op=set&key=k2", b"v").await;
    ok(&host, "kv", "op=set&key=k3", &[b'x'; 64]).await;
    says(
        refused(&host, "kv", "op=set&key=k4", b"v").await,
        "max_keys",
    );
    // 66 + 3 + 66 bytes stored; growing k2 to 64 bytes would make 198.
    ok(&host, "kv", "op=set&key=k1", &[b'y'; 64]).await;
    says(
        refused(&host, "kv", "op=set&key=k2", &[b'z'; 64]).await,
        "max_bytes",
    );
    let burned = refused(&host, "kv", "op=burn&key=k1&count=25", b"").await;
    says(burned.clone(), "max_ops");
    assert_eq!(burned["done"], 10, "{burned}");
    // Each request has its own count; nothing refused changed the data.
    assert_eq!(ok(&host, "kv", "op=get&key=k1", b"").await["len"], 64);
    assert_eq!(ok(&host, "kv", "op=get&key=k2", b"").await["value"], "v");
    assert_eq!(
        ok(&host, "kv", "op=exists&key=k4", b"").await["exists"],
        false
    );
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_refuse_by_name_and_keep_what_is_stored_p2() {
    limits_refuse_by_name_and_keep_what_is_stored("kv-draft").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_refuse_by_name_and_keep_what_is_stored_p3() {
    limits_refuse_by_name_and_keep_what_is_stored("kv-draft-p3").await;
}

/// Hostcall fuel bounds what a guest can push in one call to about the
/// value limit: a 4 MiB value traps in the lifting (that request's 500),
/// and the host and the store carry on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_far_past_the_limit_traps_only_its_request() {
    let dir = tempfile::tempdir().unwrap();
    write_policy(
        dir.path(),
        "kv",
        "[limits]\nrequest_body = \"8MiB\"\nmemory = \"128MiB\"\n\
         [keyvalue]\nstores = [\"default\"]\nmax_value_bytes = 64\n",
    );
    let host = host_with(dir.path(), &[("kv", "kv-draft")]).await;
    ok(&host, "kv", "op=set&key=k", b"kept").await;
    let big = call(&host, "kv", "op=set&key=k", &vec![b'x'; 4 << 20]).await;
    assert_eq!(
        big.status,
        StatusCode::INTERNAL_SERVER_ERROR,
        "{}",
        big.text()
    );
    assert_eq!(ok(&host, "kv", "op=get&key=k", b"").await["value"], "kept");
    host.stop().await;
}

/// `kv-draft` is a standard component: every operation answers the same
/// here (p2 and p3 builds) as under `wasmtime serve -S keyvalue` with
/// wasmtime's own in-memory store (whose only store is the empty label).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_draft_fixture_answers_as_under_wasmtime_serve() {
    let dir = tempfile::tempdir().unwrap();
    write_policy(dir.path(), "kv", GRANT_DEFAULT);
    write_policy(dir.path(), "kv3", GRANT_DEFAULT);
    let host = host_with(dir.path(), &[("kv", "kv-draft"), ("kv3", "kv-draft-p3")]).await;
    let ours = ok(&host, "kv", "op=selftest", b"").await;
    assert_eq!(ok(&host, "kv3", "op=selftest", b"").await, ours);
    assert_eq!(ours["counter"], 5, "{ours}");

    let path = dir.path().join("kv_draft.wasm");
    std::fs::write(&path, common::component("kv-draft")).unwrap();
    let wasmtime = common::WasmtimeServe::start(&path, &["-S", "keyvalue"]);
    let theirs = send(
        Method::POST,
        &format!("{}/?op=selftest&store=", wasmtime.url),
        &[],
        Vec::new(),
    )
    .await;
    assert_eq!(theirs.status, StatusCode::OK, "{}", theirs.text());
    assert_eq!(theirs.json(), ours);
    host.stop().await;
}

/// A host killed with SIGKILL while writes stream in: after a restart,
/// every write it acknowledged is there, whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_policy(&data, "notes", "[keyvalue]\nstores = [\"notes\"]\n");
    let (mut child, url, _log) = common::spawn_lichen(&data, &[]);
    let token = std::fs::read_to_string(data.join("admin-token")).unwrap();
    let auth = format!("Bearer {}", token.trim());
    let deployed = send(
        Method::PUT,
        &format!("{url}/v1/functions/notes"),
        &[("authorization", &auth)],
        common::component("notes"),
    )
    .await;
    assert_eq!(deployed.status, StatusCode::CREATED, "{}", deployed.text());

    let acked = Arc::new(Mutex::new(Vec::new()));
    let killed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..4)
        .map(|writer| {
            let (url, acked, killed) = (url.clone(), Arc::clone(&acked), Arc::clone(&killed));
            tokio::spawn(async move {
                for n in 0.. {
                    let key = format!("w{writer}-{n}");
                    let doc =
                        serde_json::json!({ "writer": writer, "n": n, "pad": "x".repeat(200) });
                    let reply = tokio::time::timeout(
                        common::PATIENCE,
                        common::try_send(
                            Method::PUT,
                            &format!("{url}/fn/notes/{key}"),
                            doc.to_string().into_bytes(),
                        ),
                    )
                    .await;
                    match reply {
                        Ok(Some(reply)) if reply.status == StatusCode::OK => {
                            acked.lock().unwrap().push((key, doc));
                        }
                        // Once the host is killed, each stops at its first
                        // failed write; before, a failure is the test's.
                        failed => {
                            let killed = killed.load(std::sync::atomic::Ordering::SeqCst);
                            assert!(killed, "{key} failed before the kill: {failed:?}");
                            break;
                        }
                    }
                }
            })
        })
        .collect();
    // Let writes flow, then kill the host mid-stream.
    common::eventually("100 writes are acknowledged", || async {
        acked.lock().unwrap().len() >= 100
    })
    .await;
    killed.store(true, std::sync::atomic::Ordering::SeqCst);
    child.kill().unwrap();
    child.wait().unwrap();
    for writer in writers {
        // Each stops at its first failed write.
        writer.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();

    let (mut child, url, _log) = common::spawn_lichen(&data, &[]);
    for (key, doc) in &acked {
        let reply = send(
            Method::GET,
            &format!("{url}/fn/notes/{key}"),
            &[],
            Vec::new(),
        )
        .await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "{key} was acknowledged: {}",
            reply.text()
        );
        assert_eq!(&reply.json(), doc, "{key}");
    }
    // Anything stored beyond the acknowledged is whole too.
    let listed = send(Method::GET, &format!("{url}/fn/notes/"), &[], Vec::new()).await;
    let keys = listed.json()["keys"].as_array().unwrap().clone();
    assert!(
        keys.len() >= acked.len(),
        "{} < {}",
        keys.len(),
        acked.len()
    );
    for key in keys {
        let key = key.as_str().unwrap();
        let reply = send(
            Method::GET,
            &format!("{url}/fn/notes/{key}"),
            &[],
            Vec::new(),
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK, "{key}: {}", reply.text());
        assert_eq!(
            reply.json()["pad"].as_str().map(str::len),
            Some(200),
            "{key}"
        );
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_shows_usage_purges_and_keeps_data_past_a_delete() {
    let dir = tempfile::tempdir().unwrap();
    write_policy(
        dir.path(),
        "kv",
        "[keyvalue]\nstores = [\"default\", \"sessions\"]\nmax_keys = 50\nmax_value_bytes = 16\n",
    );
    let host = host_with(dir.path(), &[("kv", "kv-draft")]).await;
    ok(&host, "kv", "op=set&key=a", b"12345").await;
    ok(&host, "kv", "op=set&key=bb", b"1").await;
    refused(&host, "kv", "op=set&key=c", &[b'x'; 17]).await;
    let usage = host
        .admin(Method::GET, "/v1/functions/kv/kv", Vec::new())
        .await;
    assert_eq!(usage.status, StatusCode::OK, "{}", usage.text());
    let usage = usage.json();
    assert_eq!(usage["backend"], "local");
    assert_eq!(
        usage["stores"],
        serde_json::json!([
            {"label": "default", "granted": true, "keys": 2, "bytes": 9, "max_keys": 50, "max_bytes": 64 << 20},
            {"label": "sessions", "granted": true, "keys": 0, "bytes": 0, "max_keys": 50, "max_bytes": 64 << 20},
        ])
    );

    // Metrics: operations by outcome, the refusal, the store's gauges.
    let metrics = host.get("/metrics").await.text();
    for line in [
        "lichen_kv_operations_total{function=\"kv\",op=\"set\",outcome=\"ok\"} 2",
        "lichen_kv_operations_total{function=\"kv\",op=\"set\",outcome=\"limit\"} 1",
        "lichen_kv_quota_rejections_total{function=\"kv\"} 1",
        "lichen_kv_keys{function=\"kv\",store=\"default\"} 2",
        "lichen_kv_bytes{function=\"kv\",store=\"default\"} 9",
    ] {
        assert!(metrics.contains(line), "missing {line}");
    }
    assert!(metrics.contains("lichen_kv_operation_duration_seconds_count{op=\"set\"} 3"));

    // A delete keeps the data: a redeploy finds it.
    let deleted = host
        .admin(Method::DELETE, "/v1/functions/kv", Vec::new())
        .await;
    assert_eq!(deleted.json()["purged_kv"], false);
    let kept = host
        .admin(Method::GET, "/v1/functions/kv/kv", Vec::new())
        .await;
    assert_eq!(kept.status, StatusCode::OK, "{}", kept.text());
    host.deploy("kv", common::component("kv-draft")).await;
    assert_eq!(ok(&host, "kv", "op=get&key=a", b"").await["value"], "12345");

    // Purging one store; a bad label is a 400.
    let bad = host
        .admin(
            Method::DELETE,
            "/v1/functions/kv/kv/no%20spaces",
            Vec::new(),
        )
        .await;
    bad.assert_error(StatusCode::BAD_REQUEST, "invalid_label");
    let purged = host
        .admin(Method::DELETE, "/v1/functions/kv/kv/default", Vec::new())
        .await;
    assert_eq!(purged.status, StatusCode::OK, "{}", purged.text());
    assert_eq!(
        ok(&host, "kv", "op=get&key=a", b"").await["value"],
        serde_json::Value::Null
    );

    // A delete with purge_kv=true takes the data with it.
    ok(&host, "kv", "op=set&key=a", b"again").await;
    let bad = host
        .admin(
            Method::DELETE,
            "/v1/functions/kv?purge_kv=maybe",
            Vec::new(),
        )
        .await;
    bad.assert_error(StatusCode::BAD_REQUEST, "invalid_query");
    let deleted = host
        .admin(Method::DELETE, "/v1/functions/kv?purge_kv=true", Vec::new())
        .await;
    assert_eq!(deleted.json()["purged_kv"], true, "{}", deleted.text());
    let gone = host
        .admin(Method::GET, "/v1/functions/kv/kv", Vec::new())
        .await;
    gone.assert_error(StatusCode::NOT_FOUND, "not_found");
    host.stop().await;
}

/// A component from another toolchain keeps state unmodified: Python
/// (componentize-py), WASIp3, importing `wasi:keyvalue@0.2.0-draft`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_component_keeps_count() {
    let dir = tempfile::tempdir().unwrap();
    write_policy(dir.path(), "pycount", GRANT_DEFAULT);
    let host = TestHost::start(test_config(dir.path())).await;
    let deployed = host
        .deploy_large("pycount", common::python_component("counter"))
        .await;
    assert_eq!(deployed.status, StatusCode::CREATED, "{}", deployed.text());
    assert_eq!(deployed.json()["abi"], "p3");
    for expected in 1..=3 {
        let reply = host.get("/fn/pycount/a").await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        let answer = reply.json();
        assert_eq!(answer["visits"], expected, "{answer}");
        assert_eq!(answer["language"], "python");
    }
    let denied = host.get("/fn/pycount/a?store=other").await;
    assert_eq!(
        denied.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        denied.text()
    );
    assert_eq!(denied.json()["error"], "AccessDenied");
    host.stop().await;
}

/// `max_ops` counts per request, also when an instance serves several.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_instance_counts_operations_per_request() {
    let dir = tempfile::tempdir().unwrap();
    write_policy(
        dir.path(),
        "kv",
        "[instances]\nreuse = 10\n[keyvalue]\nstores = [\"default\"]\nmax_ops = 10\n",
    );
    let host = host_with(dir.path(), &[("kv", "kv-draft")]).await;
    for _ in 0..3 {
        assert_eq!(
            ok(&host, "kv", "op=burn&key=k&count=10", b"").await["done"],
            10
        );
    }
    let over = refused(&host, "kv", "op=burn&key=k&count=11", b"").await;
    assert_eq!(over["done"], 10, "{over}");
    assert!(host.metric("lichen_instances_total").await >= 1.0);
    let reused = host.get("/metrics").await.text();
    assert!(
        reused.contains("lichen_instances_total{event=\"reused\",function=\"kv\"} 3"),
        "{reused}"
    );
    host.stop().await;
}
