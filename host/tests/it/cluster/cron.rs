//! Cron triggers on real hosts: the probe fixture's `/relay` posts what
//! each tick sent it (method, `x-lichen-*` headers, body) to a recorder in
//! the test, which counts the ticks by their id.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Full};

use super::{Node, SECRET, deploy_with_policy, on_nats, three};
use crate::common::{self, eventually};

pub type Seen = Arc<Mutex<Vec<serde_json::Value>>>;

/// A recorder on loopback: keeps each JSON body posted to it.
async fn recorder() -> (SocketAddr, Seen) {
    recorder_on("127.0.0.1").await
}

/// A recorder on a free port of `ip`.
pub async fn recorder_on(ip: &str) -> (SocketAddr, Seen) {
    let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let kept = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let kept = Arc::clone(&kept);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let kept = Arc::clone(&kept);
                        async move {
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
                            kept.lock().unwrap().push(value);
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
    (addr, seen)
}

/// A policy relaying every tick of `schedule` to `recorder`.
pub fn relaying(schedule: &str, recorder: SocketAddr) -> String {
    format!(
        "[outbound]\nallow = [\"http://{recorder}\"]\n\n[[triggers.cron]]\nschedule = \"{schedule}\"\npath = \"/relay?url=http://{recorder}/tick\"\nbody = {{ job = \"sweep\" }}\n"
    )
}

/// Deploys the probe relaying every second's tick to `recorder` on
/// `first` (and so on `others`), and waits until each host sees all the
/// others serve it and a first tick was relayed.
async fn ticking(first: &Node, others: &[&Node], recorder: SocketAddr, seen: &Seen) {
    deploy_with_policy(first, others, "probe", &relaying("* * * * * *", recorder)).await;
    for node in std::iter::once(first).chain(others.iter().copied()) {
        eventually(&format!("{} sees its peers serve probe", node.id), || {
            node.sees_serving(others.len(), "probe")
        })
        .await;
    }
    eventually("a first tick relayed", || async { !ticks(seen).is_empty() }).await;
}

/// Tick ids the recorder got, with how many times each.
pub fn ticks(seen: &Seen) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for value in seen.lock().unwrap().iter() {
        let id = value["headers"]["x-lichen-trigger-id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        *counts.entry(id).or_insert(0) += 1;
    }
    counts
}

/// Waits (up to `patience`) until every second of `expected` has a tick
/// the recorder got; answers the ids of ticks run more than once and the
/// seconds still without a tick.
pub async fn settle(seen: &Seen, expected: &[i64], patience: Duration) -> (Vec<String>, Vec<i64>) {
    let missing = || {
        let ran: std::collections::BTreeSet<i64> = ticks(seen)
            .keys()
            .map(|id| tick_time(id).as_second())
            .collect();
        expected
            .iter()
            .filter(|t| !ran.contains(t))
            .copied()
            .collect::<Vec<i64>>()
    };
    let waited = std::time::Instant::now();
    while !missing().is_empty() && waited.elapsed() < patience {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let twice = ticks(seen)
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .map(|(id, _)| id)
        .collect();
    (twice, missing())
}

/// The tick time of an id `FUNCTION/INDEX/TIME`.
pub fn tick_time(id: &str) -> jiff::Timestamp {
    id.rsplit('/').next().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cron_trigger_ticks_with_its_headers_and_body_and_can_be_run_by_hand() {
    let root = tempfile::tempdir().unwrap();
    let (recorder, seen) = recorder().await;
    let a = Node::start(root.path(), "a", &[], SECRET);
    deploy_with_policy(&a, &[], "probe", &relaying("* * * * * *", recorder)).await;
    eventually("three ticks relayed", || async { ticks(&seen).len() >= 3 }).await;

    let first = seen.lock().unwrap()[0].clone();
    assert_eq!(first["method"], "POST");
    assert_eq!(first["path"], "/relay");
    assert_eq!(first["headers"]["x-lichen-trigger"], "cron");
    assert_eq!(first["body"], r#"{"job":"sweep"}"#);
    let counts = ticks(&seen);
    assert!(counts.values().all(|n| *n == 1), "{counts:?}");
    let times: Vec<jiff::Timestamp> = counts.keys().map(|id| tick_time(id)).collect();
    for id in counts.keys() {
        assert!(id.starts_with("probe/0/"), "{id}");
    }
    for pair in times.windows(2) {
        assert_eq!(pair[1].duration_since(pair[0]).as_secs(), 1, "{times:?}");
    }

    // The status page's view: the next tick and the runs.
    let status = a.admin(Method::GET, "/v1/status", Vec::new()).await.json();
    let probe = status["functions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "probe")
        .unwrap()
        .clone();
    let trigger = &probe["triggers"][0];
    assert_eq!(trigger["schedule"], "* * * * * *");
    assert!(trigger["next"].is_string(), "{trigger}");
    assert_eq!(trigger["runs"][0]["status"], 200, "{trigger}");
    assert_eq!(trigger["runs"][0]["host"], "a", "{trigger}");
    let metrics = a.metrics().await;
    assert!(
        metrics.contains(r#"lichen_trigger_runs_total{function="probe",outcome="ok",trigger="0"}"#),
        "{metrics}"
    );

    // Fired by hand: once, now.
    let before = seen.lock().unwrap().len();
    let run = a
        .admin(
            Method::POST,
            "/v1/functions/probe/triggers/0/run",
            Vec::new(),
        )
        .await;
    assert_eq!(run.status, StatusCode::OK, "{}", run.text());
    assert_eq!(run.json()["status"], 200);
    let id = run.json()["id"].as_str().unwrap().to_string();
    eventually("the run by hand relayed", || async {
        seen.lock().unwrap()[before..]
            .iter()
            .any(|v| v["headers"]["x-lichen-trigger-id"] == id.as_str())
    })
    .await;
    let missing = a
        .admin(
            Method::POST,
            "/v1/functions/probe/triggers/3/run",
            Vec::new(),
        )
        .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND, "{}", missing.text());
    assert!(
        missing.text().contains("1 cron trigger"),
        "{}",
        missing.text()
    );

    // A bad schedule is refused with its reason; the good one stays.
    let bad = relaying("61 * * * * *", recorder);
    let refused = a
        .admin(Method::PUT, "/v1/functions/probe/policy", bad.into_bytes())
        .await;
    assert_eq!(
        refused.status,
        StatusCode::BAD_REQUEST,
        "{}",
        refused.text()
    );
    assert!(
        refused.text().contains("not a cron schedule"),
        "{}",
        refused.text()
    );
    let count = ticks(&seen).len();
    eventually("ticks go on under the last good policy", || async {
        ticks(&seen).len() >= count + 2
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_tick_runs_once_across_three_hosts_while_one_dies_and_comes_back() {
    let root = tempfile::tempdir().unwrap();
    let (recorder, seen) = recorder().await;
    let (a, b, mut c) = three(root.path()).await;
    // Counted from the first tick relayed: the hosts have settled.
    ticking(&a, &[&b, &c], recorder, &seen).await;
    let started = jiff::Timestamp::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    c.kill();
    let killed = jiff::Timestamp::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let c = Node::launch(root.path(), "c", &c.gossip, &[&a], SECRET, &[]);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let ended = jiff::Timestamp::now();

    // Every tick from a second after the start to the end, but those
    // around the kill: the dead host may have claimed one and died before
    // its guest ran, and the others pass it over within the failure
    // detector's interval. A tick is run up to a few takeover steps late,
    // and relayed after: the last ones are waited for.
    let grace = (killed.as_second() - 1)..=(killed.as_second() + 3);
    let expected: Vec<i64> = (started.as_second() + 1..ended.as_second())
        .filter(|t| !grace.contains(t))
        .collect();
    let (twice, missing) = settle(&seen, &expected, Duration::from_secs(20)).await;
    drop(c);
    assert!(twice.is_empty(), "ticks run more than once: {twice:?}");
    assert!(
        missing.is_empty(),
        "ticks nobody ran: {missing:?} of {:?}",
        ticks(&seen)
    );
    let hosts = a.metrics().await;
    assert!(hosts.contains("lichen_trigger_claims_total"), "{hosts}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_nats_a_host_cut_off_from_its_peers_still_runs_no_tick_twice() {
    let root = tempfile::tempdir().unwrap();
    let (recorder, seen) = recorder().await;
    let nats = common::NatsServer::start(&root.path().join("nats"));
    let flags = on_nats(&nats.url);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    // a and b see each other; c sees neither (it was given no peer) but
    // shares their NATS, as a host on the far side of a partition does.
    let a = Node::start_with(root.path(), "a", &[], SECRET, &flags);
    let b = Node::start_with(root.path(), "b", &[&a], SECRET, &flags);
    let c = Node::start_with(root.path(), "c", &[], SECRET, &flags);
    eventually("a and b see each other", || async {
        a.peer_ids().await == ["b"] && b.peer_ids().await == ["a"]
    })
    .await;
    let policy = relaying("* * * * * *", recorder);
    deploy_with_policy(&a, &[&b], "probe", &policy).await;
    // c holds the same module and policy, deployed to it directly.
    deploy_with_policy(&c, &[], "probe", &policy).await;
    assert!(c.peer_ids().await.is_empty());

    // Both sides try every tick; the lease leaves one of them each time.
    eventually(
        "eight ticks, and a lease lost to the other side",
        || async {
            let mut lost = false;
            for node in [&a, &b, &c] {
                lost |= node
                    .metrics()
                    .await
                    .contains(r#"lichen_trigger_claims_total{outcome="lost"}"#);
            }
            ticks(&seen).len() >= 8 && lost
        },
    )
    .await;
    let (twice, _) = settle(&seen, &[], Duration::ZERO).await;
    assert!(twice.is_empty(), "ticks run more than once: {twice:?}");
    let counts = ticks(&seen);
    let times: Vec<i64> = counts.keys().map(|id| tick_time(id).as_second()).collect();
    for pair in times.windows(2) {
        assert_eq!(pair[1] - pair[0], 1, "a tick nobody ran: {times:?}");
    }
}

/// A TCP relay on loopback to `upstream`, until cut: then every relayed
/// connection is closed and new ones are refused, as when a host loses
/// its way to a server.
struct Relay {
    addr: SocketAddr,
    cut: tokio::sync::watch::Sender<bool>,
}

impl Relay {
    async fn to(upstream: SocketAddr) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cut, mut is_cut) = tokio::sync::watch::channel(false);
        let cutting = cut.subscribe();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    _ = is_cut.changed() => return,
                };
                let Ok((mut inbound, _)) = accepted else {
                    return;
                };
                let mut cut = cutting.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Relay { addr, cut }
    }

    fn cut(&self) {
        let _ = self.cut.send(true);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_cannot_take_a_lease_releases_the_tick_to_its_peers() {
    let root = tempfile::tempdir().unwrap();
    let (recorder, seen) = recorder().await;
    let nats = common::NatsServer::start(&root.path().join("nats"));
    let upstream: SocketAddr = nats.url.trim_start_matches("nats://").parse().unwrap();
    let relay = Relay::to(upstream).await;
    let flags = on_nats(&nats.url);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    // c reaches NATS through the relay, and fails fast without it.
    let through = format!("nats://{}", relay.addr);
    let c_flags = [
        "--kv-backend",
        "nats",
        "--kv-nats-url",
        &through,
        "--kv-nats-replicas",
        "1",
        "--kv-nats-timeout",
        "3s",
    ];
    let a = Node::start_with(root.path(), "a", &[], SECRET, &flags);
    let b = Node::start_with(root.path(), "b", &[&a], SECRET, &flags);
    let c = Node::start_with(root.path(), "c", &[&a], SECRET, &c_flags);
    ticking(&a, &[&b, &c], recorder, &seen).await;

    // c can still reach its peers, which accept its claims, but not NATS.
    relay.cut();
    let cut = jiff::Timestamp::now().as_second();
    eventually("c fails to take a lease", || async {
        c.metrics()
            .await
            .contains(r#"lichen_trigger_claims_total{outcome="lease_unavailable"}"#)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    let ended = jiff::Timestamp::now().as_second();

    // Every tick runs, once: those c claimed, a or b after its release.
    // One claimed as the relay was cut may have its lease created unseen.
    let expected: Vec<i64> = (cut + 2..ended).collect();
    let (twice, missing) = settle(&seen, &expected, Duration::from_secs(30)).await;
    assert!(twice.is_empty(), "ticks run more than once: {twice:?}");
    assert!(
        missing.is_empty(),
        "ticks nobody ran after the cut at {cut}: {missing:?} of {:?}",
        ticks(&seen)
    );
}
