//! The shared key-value backend against real `nats-server`s started by the
//! test on free loopback ports: the conformance suite every backend passes,
//! and a site of three NATS servers and two Lichen hosts that keeps every
//! acknowledged write through the loss of a server.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{NatsServer, PATIENCE, TestHost, eventually, send, test_config, write_policy};
use http::{Method, StatusCode};
use lichen::kv::{NatsBackend, conformance};
use lichen::server::KvConfig;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_passes_the_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(dir.path());
    let backend = Arc::new(
        NatsBackend::connect(
            std::slice::from_ref(&nats.url),
            1,
            PATIENCE,
            &Default::default(),
        )
        .await
        .unwrap(),
    );
    if let Err(failure) = conformance::check(&backend, "nats").await {
        panic!("{failure}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_shares_its_stores_and_survives_losing_a_nats_server() {
    let dir = tempfile::tempdir().unwrap();
    let mut nats = NatsServer::cluster(&dir.path().join("nats"));
    NatsServer::until_replicated(&nats).await;
    let urls: Vec<String> = nats.iter().map(|n| n.url.clone()).collect();
    let host = |name: &str| {
        let data = dir.path().join(name);
        write_policy(&data, "counter", "[keyvalue]\nstores = [\"default\"]\n");
        write_policy(&data, "notes", "[keyvalue]\nstores = [\"notes\"]\n");
        let mut config = test_config(&data);
        config.kv = KvConfig::Nats {
            urls: urls.clone(),
            replicas: 3,
            // A loaded machine slows the cluster down; an answer that
            // comes late is still an answer.
            timeout: PATIENCE,
        };
        config
    };
    let a = TestHost::start(host("a")).await;
    let b = TestHost::start(host("b")).await;
    for h in [&a, &b] {
        for name in ["counter", "notes"] {
            let reply = h.deploy(name, common::component(name)).await;
            assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
        }
        assert_eq!(h.get("/readyz").await.status, StatusCode::OK);
    }

    let put = |host: &TestHost, key: String, n: usize| {
        let url = format!("{}/fn/notes/{key}", host.url);
        async move {
            send(
                Method::PUT,
                &url,
                &[],
                format!("{{\"n\":{n}}}").into_bytes(),
            )
            .await
        }
    };
    // Writes through A are read through B; counts from both add up.
    for n in 0..10 {
        let reply = put(&a, format!("k{n}"), n).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    }
    for n in 0..10 {
        let reply = b.get(&format!("/fn/notes/k{n}")).await;
        assert_eq!(reply.status, StatusCode::OK, "k{n}: {}", reply.text());
        assert_eq!(reply.json()["n"], n);
    }
    // The counter's store exists and each host has opened it (the first
    // use of a new replicated store by two hosts at once can still fail
    // one call while the servers agree on it; see the note in kv/nats.rs).
    for h in [&a, &b] {
        let reply = h.get("/fn/counter/shared").await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    }
    // 24 increments of one counter at once, through both hosts: exact.
    let increments: Vec<_> = (0..24)
        .map(|i| {
            let url = format!(
                "{}/fn/counter/shared",
                if i % 2 == 0 { &a.url } else { &b.url }
            );
            tokio::spawn(async move { send(Method::GET, &url, &[], Vec::new()).await })
        })
        .collect();
    for increment in increments {
        let reply = increment.await.unwrap();
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    }
    assert_eq!(b.get("/fn/counter/shared").await.json()["visits"], 27);

    // One NATS server dies: writes and reads go on, nothing is lost.
    nats[0].kill();
    let mut acked = Vec::new();
    for n in 10..30 {
        let writer = if n % 2 == 0 { &a } else { &b };
        // The cluster may take a moment to move a stream's leader.
        eventually(
            &format!("k{n} is stored with two of three servers up"),
            || async { put(writer, format!("k{n}"), n).await.status == StatusCode::OK },
        )
        .await;
        acked.push(n);
    }
    for n in (0..10).chain(acked) {
        let reader = if n % 2 == 0 { &b } else { &a };
        let reply = reader.get(&format!("/fn/notes/k{n}")).await;
        assert_eq!(reply.status, StatusCode::OK, "k{n}: {}", reply.text());
        assert_eq!(reply.json()["n"], n);
    }
    // Listing makes a consumer, which the cluster may be moving too.
    let mut listed = serde_json::Value::Null;
    let started = Instant::now();
    while started.elapsed() < PATIENCE {
        let reply = a.get("/fn/notes/").await;
        listed = reply.json();
        if reply.status == StatusCode::OK {
            eprintln!("listed after {:?}", started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        listed["keys"].as_array().map(Vec::len),
        Some(30),
        "{listed}"
    );
    a.stop().await;
    b.stop().await;
}

/// A host whose NATS servers are gone keeps serving: key-value operations
/// get the interface's error (a 500 from the SDK's `?`, never a trap), and
/// `/readyz` says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_nats_is_an_error_for_the_guest_and_not_ready() {
    let dir = tempfile::tempdir().unwrap();
    let mut nats = NatsServer::start(&dir.path().join("nats"));
    let data = dir.path().join("host");
    // The guest's deadline is far past the backend's request timeout, so
    // what it meets is the backend's error, however slow the machine.
    write_policy(
        &data,
        "kv",
        "[keyvalue]\nstores = [\"default\"]\n[limits]\ntimeout = \"2m\"\n",
    );
    let mut config = test_config(&data);
    config.kv = KvConfig::Nats {
        urls: vec![nats.url.clone()],
        replicas: 1,
        // Requests wait this long for NATS to come back before failing.
        timeout: Duration::from_secs(10),
    };
    let host = TestHost::start(config).await;
    let reply = host.deploy("kv", common::component("kv-draft")).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    let set = send(
        Method::POST,
        &format!("{}/fn/kv?op=set&key=k", host.url),
        &[],
        b"v".to_vec(),
    )
    .await;
    assert_eq!(set.status, StatusCode::OK, "{}", set.text());

    nats.kill();
    eventually("/readyz says the key-value backend is gone", || async {
        let ready = host.get("/readyz").await;
        ready.status == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    let ready = host.get("/readyz").await;
    assert!(ready.text().contains("key-value"), "{}", ready.text());
    let get = send(
        Method::POST,
        &format!("{}/fn/kv?op=get&key=k", host.url),
        &[],
        Vec::new(),
    )
    .await;
    assert_eq!(
        get.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        get.text()
    );
    assert_eq!(get.json()["error"], "other");
    assert!(
        get.json()["message"]
            .as_str()
            .unwrap_or_default()
            .contains("unavailable"),
        "{}",
        get.text()
    );
    assert_eq!(host.get("/healthz").await.status, StatusCode::OK);
    host.stop().await;
}

/// The registry on NATS through a secret's rotation: an entry written
/// under the old secret alone is sealed again by the first host holding
/// both that reads it, so a host left with the new secret alone (the
/// rotation's end) still reads it; a host with another secret reads
/// nothing and counts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_entries_on_nats_outlive_a_secret_rotation() {
    use lichen::names::FunctionName;
    use lichen::shared_registry::{SharedRegistry, Written};
    use lichen_core::registry::Entry;
    use lichen_core::seal::{Keyring, Secret};

    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(dir.path());
    let client = async_nats::connect(&nats.url).await.unwrap();
    let secret = |text: &str| Secret::new(text).unwrap();
    let registry = |keyring: Keyring| {
        let rejected = prometheus::IntCounter::new("rejected", "rejected").unwrap();
        let registry = SharedRegistry::new(
            async_nats::jetstream::new(client.clone()),
            1,
            Arc::new(keyring),
            rejected.clone(),
        );
        (registry, rejected)
    };
    let name = FunctionName::new("rotated").unwrap();
    let mut entry = Entry::new("rotated");
    entry.set_policy("[limits]\nqueue = 7\n".to_string(), 1 << 20, "a");

    let (old, _) = registry(Keyring::new(secret("the old secret, long enough"), None));
    assert!(matches!(
        old.write(&name, &entry, 0).await.unwrap(),
        Written::At(_)
    ));
    // Mid-rotation: new and old. It reads the entry, and seals it again.
    let (both, _) = registry(Keyring::new(
        secret("the new secret, long enough"),
        Some(secret("the old secret, long enough")),
    ));
    let (read, first) = both.read(&name).await.unwrap();
    assert_eq!(read.as_ref(), Some(&entry));
    eventually("the entry is sealed again", || async {
        both.read(&name).await.unwrap().1 > first
    })
    .await;
    // The rotation's end: the new secret alone still reads it.
    let (new, rejected) = registry(Keyring::new(secret("the new secret, long enough"), None));
    assert_eq!(new.read(&name).await.unwrap().0.as_ref(), Some(&entry));
    assert_eq!(rejected.get(), 0);
    // Another cluster's secret reads nothing, and counts it.
    let (other, rejected) = registry(Keyring::new(secret("another cluster's secret!!"), None));
    assert_eq!(other.read(&name).await.unwrap().0, None);
    assert_eq!(rejected.get(), 1);
}

/// What the duplicating relay did.
#[derive(Default)]
struct Relayed {
    /// The reply subject of the publish sent twice, until its first answer
    /// is dropped.
    dropping: Option<String>,
    /// Publishes sent twice, answers dropped.
    doubled: u32,
    dropped: u32,
    /// Whether the next write to a store key is doubled.
    armed: bool,
}

/// One NATS protocol frame read from `buffer`: its head line and the whole
/// frame's bytes, or `None` until it has all arrived.
fn nats_frame(buffer: &[u8]) -> Option<(String, usize)> {
    let end = buffer.windows(2).position(|w| w == b"\r\n")?;
    let line = String::from_utf8_lossy(&buffer[..end]).to_string();
    let words: Vec<&str> = line.split_whitespace().collect();
    let verb = words
        .first()
        .map(|w| w.to_ascii_uppercase())
        .unwrap_or_default();
    let payload = match verb.as_str() {
        "PUB" | "HPUB" | "MSG" | "HMSG" => words.last()?.parse::<usize>().ok()? + 2,
        _ => 0,
    };
    let total = end + 2 + payload;
    (buffer.len() >= total).then_some((line, total))
}

/// A relay between a host and `nats-server` that, once armed, sends the
/// next compare-and-swap write to a store key twice and drops the server's
/// first answer to it: a write that reached the stream twice and whose
/// first answer was lost, as a connection cut after the publish leaves it.
async fn duplicating_relay(upstream: String) -> (String, Arc<std::sync::Mutex<Relayed>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("nats://{}", listener.local_addr().unwrap());
    let upstream = upstream.trim_start_matches("nats://").to_string();
    let state: Arc<std::sync::Mutex<Relayed>> = Arc::default();
    let shared = Arc::clone(&state);
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                continue;
            };
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            // To the server: the armed write to a store key, twice.
            let state = Arc::clone(&shared);
            tokio::spawn(pump(client_read, server_write, move |words, frame| {
                let mut state = state.lock().unwrap();
                let write = words.first() == Some(&"HPUB")
                    && words.len() == 5
                    && words[1].starts_with("$KV.")
                    && !words[1].contains(".=")
                    && String::from_utf8_lossy(frame)
                        .contains("Nats-Expected-Last-Subject-Sequence");
                if write && state.armed {
                    state.armed = false;
                    state.doubled += 1;
                    state.dropping = Some(words[2].to_string());
                    2
                } else {
                    1
                }
            }));
            // To the client: the first answer to that write, dropped.
            let state = Arc::clone(&shared);
            tokio::spawn(pump(server_read, client_write, move |words, _| {
                let mut state = state.lock().unwrap();
                let answer = matches!(words.first(), Some(&"MSG") | Some(&"HMSG"))
                    && state.dropping.as_deref() == words.get(1).copied();
                if answer {
                    state.dropping = None;
                    state.dropped += 1;
                    0
                } else {
                    1
                }
            }));
        }
    });
    (url, state)
}

/// Copies NATS frames from `from` to `to`, each as many times as `copies`
/// says (given the frame's head line in words, and the whole frame), until
/// either side closes.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut copies: impl FnMut(&[&str], &[u8]) -> usize,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 16384];
    loop {
        match from.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
        }
        while let Some((line, total)) = nats_frame(&buffer) {
            let frame: Vec<u8> = buffer.drain(..total).collect();
            let words: Vec<&str> = line.split_whitespace().collect();
            for _ in 0..copies(&words, &frame) {
                if to.write_all(&frame).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// An increment whose write reached the stream twice and whose first answer
/// was lost (a relay doubles the publish and drops that answer): the
/// counter goes up by one, not two. Before every write carried a
/// `Nats-Msg-Id` (and a "wrong last sequence" answer was checked against
/// the key's last message), the second copy's refusal was taken for a lost
/// race and the increment made again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_reaches_nats_twice_counts_once() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(&dir.path().join("nats"));
    let (relay, relayed) = duplicating_relay(nats.url.clone()).await;
    let data = dir.path().join("host");
    write_policy(&data, "kv", "[keyvalue]\nstores = [\"default\"]\n");
    let mut config = test_config(&data);
    config.kv = KvConfig::Nats {
        urls: vec![relay],
        replicas: 1,
        timeout: Duration::from_secs(10),
    };
    let host = TestHost::start(config).await;
    let reply = host.deploy("kv", common::component("kv-draft")).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    let increment = || async {
        send(
            Method::POST,
            &format!("{}/fn/kv?op=increment&key=n", host.url),
            &[],
            Vec::new(),
        )
        .await
    };
    // The key exists first, so the doubled write is the increment's.
    let first = increment().await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text());
    assert_eq!(first.json()["value"], 1);
    for expected in 2..=4 {
        relayed.lock().unwrap().armed = true;
        let reply = increment().await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(reply.json()["value"], expected, "{}", reply.text());
        let relayed = relayed.lock().unwrap();
        assert_eq!(
            (relayed.doubled, relayed.dropped),
            (expected - 1, expected - 1),
            "the relay did not double the write and drop its answer"
        );
    }
    let read = send(
        Method::POST,
        &format!("{}/fn/kv?op=get&key=n", host.url),
        &[],
        Vec::new(),
    )
    .await;
    assert_eq!(read.status, StatusCode::OK, "{}", read.text());
    assert_eq!(read.json()["value"], "4", "{}", read.text());
    host.stop().await;
}
