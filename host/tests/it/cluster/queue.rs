//! NATS message triggers on real hosts and a real `nats-server`: the
//! consumer fixture records each message's stream sequence in its store
//! (on the same NATS), so the test sees which messages were handled.

use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use http::{Method, StatusCode};

use super::{Node, SECRET, deploy_fixture_with_policy, on_nats, three_with};
use crate::common::{self, eventually};

async fn jetstream_of(url: &str) -> jetstream::Context {
    let client = async_nats::connect(url).await.unwrap();
    jetstream::new(client)
}

async fn stream(js: &jetstream::Context, name: &str, subjects: &[&str]) {
    js.create_stream(jetstream::stream::Config {
        name: name.to_string(),
        subjects: subjects.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    })
    .await
    .unwrap();
}

fn consuming(trigger: &str) -> String {
    format!(
        "[keyvalue]\nstores = [\"default\"]\nmax_keys = 100000\n\n[limits]\nconcurrency = 64\n\n{trigger}"
    )
}

/// The status of trigger `index` of `function` on `node`.
async fn trigger_status(node: &Node, function: &str, index: usize) -> serde_json::Value {
    let status = node
        .admin(Method::GET, "/v1/status", Vec::new())
        .await
        .json();
    let row = status["functions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == function)
        .cloned()
        .unwrap_or_default();
    row["triggers"][index].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_are_invoked_answered_retried_and_dead_lettered() {
    let root = tempfile::tempdir().unwrap();
    let nats = common::NatsServer::start(&root.path().join("nats"));
    let js = jetstream_of(&nats.url).await;
    stream(&js, "ORDERS", &["orders.>"]).await;
    stream(&js, "DEAD", &["dead.>"]).await;
    let flags = on_nats(&nats.url);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let a = Node::start_with(root.path(), "a", &[], SECRET, &flags);
    let policy = consuming(
        "[[triggers.nats]]\nstream = \"ORDERS\"\nsubject = \"orders.>\"\ndead_letter = \"dead.orders\"\nack_wait = \"5s\"\n",
    );
    deploy_fixture_with_policy(&a, &[], "orders", "consumer", &policy).await;
    eventually("the consumer pulls", || async {
        trigger_status(&a, "orders", 0).await["consuming"] == true
    })
    .await;

    // A message with a reply subject: invoked with its headers, answered.
    let client = async_nats::connect(&nats.url).await.unwrap();
    let mut replies = client.subscribe("replies.1").await.unwrap();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Lichen-Reply-To", "replies.1");
    headers.insert("Order-Id", "o-17");
    js.publish_with_headers("orders.new", headers, "hello".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(60), replies.next())
        .await
        .expect("a reply within a minute")
        .unwrap();
    let answer: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(answer["sequence"], "1", "{answer}");
    assert_eq!(answer["times"], 1, "{answer}");
    assert_eq!(answer["body"], "hello", "{answer}");

    // A message the function fails: delivered five times (the default
    // max_deliver), then a dead letter with the error, and never again.
    js.publish("orders.new", "fail".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let dead_letters = || async {
        let mut dead = js.get_stream("DEAD").await.unwrap();
        dead.info().await.unwrap().state.messages
    };
    eventually("the failing message is dead-lettered", || async {
        dead_letters().await == 1
    })
    .await;
    let dead = js.get_stream("DEAD").await.unwrap();
    let letter = dead.get_raw_message(1).await.unwrap();
    assert_eq!(letter.payload, "fail");
    let error = letter
        .headers
        .get("Lichen-Error")
        .unwrap()
        .as_str()
        .to_string();
    assert!(
        error.contains("500") && error.contains("refusing message 2"),
        "{error}"
    );
    assert_eq!(
        letter.headers.get("Lichen-Deliveries").unwrap().as_str(),
        "5"
    );
    let status = trigger_status(&a, "orders", 0).await;
    assert_eq!(status["kind"], "nats", "{status}");
    assert_eq!(status["handled"]["ok"], 1, "{status}");
    assert_eq!(status["handled"]["retried"], 4, "{status}");
    assert_eq!(status["handled"]["dead_lettered"], 1, "{status}");
    let metrics = a.metrics().await;
    assert!(
        metrics.contains(r#"lichen_trigger_messages_total{function="orders",outcome="dead_lettered",trigger="0"} 1"#),
        "{metrics}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(dead_letters().await, 1);

    // A stream that does not exist: refused with its reason; the last good
    // policy goes on consuming.
    let missing = consuming("[[triggers.nats]]\nstream = \"NOPE\"\n");
    let put = a
        .admin(
            Method::PUT,
            "/v1/functions/orders/policy",
            missing.into_bytes(),
        )
        .await;
    assert_eq!(put.status, StatusCode::BAD_REQUEST, "{}", put.text());
    assert!(put.text().contains("no such stream"), "{}", put.text());
    // Nor is a subject filter that matches nothing the stream holds.
    let elsewhere = consuming("[[triggers.nats]]\nstream = \"ORDERS\"\nsubject = \"invoices.>\"\n");
    let put = a
        .admin(
            Method::PUT,
            "/v1/functions/orders/policy",
            elsewhere.into_bytes(),
        )
        .await;
    assert_eq!(put.status, StatusCode::BAD_REQUEST, "{}", put.text());
    assert!(
        put.text()
            .contains("matches nothing the stream \\\"ORDERS\\\" holds"),
        "{}",
        put.text()
    );
    js.publish("orders.new", "after".into())
        .await
        .unwrap()
        .await
        .unwrap();
    eventually("the last good policy consumes on", || async {
        trigger_status(&a, "orders", 0).await["handled"]["ok"] == 2
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_finds_no_room_waits_and_is_never_dead_lettered_for_it() {
    const MESSAGES: u64 = 40;
    let root = tempfile::tempdir().unwrap();
    let nats = common::NatsServer::start(&root.path().join("nats"));
    let js = jetstream_of(&nats.url).await;
    stream(&js, "JOBS", &["jobs.>"]).await;
    stream(&js, "DEAD", &["dead.>"]).await;
    let flags = on_nats(&nats.url);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let a = Node::start_with(root.path(), "a", &[], SECRET, &flags);
    // One at a time and no queue, eight messages in hand: seven of them
    // find no room each time. One delivery each before a dead letter.
    // The messages are there first, so the first pull brings eight.
    let mut acks = Vec::new();
    for i in 0..MESSAGES {
        acks.push(js.publish("jobs.new", format!("{i}").into()).await.unwrap());
    }
    for ack in acks {
        ack.await.unwrap();
    }
    let policy = "[keyvalue]\nstores = [\"default\"]\n\n[limits]\nconcurrency = 1\nqueue = 0\n\n[[triggers.nats]]\nstream = \"JOBS\"\nmax_inflight = 8\nmax_deliver = 1\ndead_letter = \"dead.jobs\"\n";
    deploy_fixture_with_policy(&a, &[], "jobs", "consumer", policy).await;
    eventually("every message handled", || async {
        trigger_status(&a, "jobs", 0).await["handled"]["ok"] == MESSAGES
    })
    .await;
    let count = a.post("/fn/jobs/count", "").await.json();
    assert_eq!(count["seen"], MESSAGES, "{count}");
    let mut dead = js.get_stream("DEAD").await.unwrap();
    assert_eq!(dead.info().await.unwrap().state.messages, 0);
    let status = trigger_status(&a, "jobs", 0).await;
    assert!(status["handled"]["dead_lettered"].is_null(), "{status}");
    // The function was busy: its refusals were counted.
    let metrics = a.metrics().await;
    assert!(
        common::series_sum(
            &metrics,
            r#"lichen_invocations_total{function="jobs",outcome="rejected"}"#
        ) > 0.0,
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_messages_over_three_hosts_are_each_handled_while_one_dies() {
    const MESSAGES: u64 = 10_000;
    const INFLIGHT: u64 = 32;
    let root = tempfile::tempdir().unwrap();
    let nats = common::NatsServer::start(&root.path().join("nats"));
    let js = jetstream_of(&nats.url).await;
    stream(&js, "READINGS", &["readings.>"]).await;
    let flags = on_nats(&nats.url);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let (a, b, mut c) = three_with(root.path(), &flags).await;
    let policy = consuming(&format!(
        "[[triggers.nats]]\nstream = \"READINGS\"\nmax_inflight = {INFLIGHT}\nack_wait = \"5s\"\n"
    ));
    deploy_fixture_with_policy(&a, &[&b, &c], "readings", "consumer", &policy).await;
    for node in [&a, &b, &c] {
        eventually(&format!("{} pulls", node.id), || async {
            trigger_status(node, "readings", 0).await["consuming"] == true
        })
        .await;
    }
    // In rounds: the client holds only so many unconfirmed publishes.
    for round in 0..MESSAGES / 500 {
        let mut acks = Vec::new();
        for i in round * 500..(round + 1) * 500 {
            let subject = format!("readings.s{}", i % 7);
            acks.push(js.publish(subject, format!("{i}").into()).await.unwrap());
        }
        for ack in acks {
            ack.await.unwrap();
        }
    }
    // c dies with messages in hand.
    eventually("c has handled some", || async {
        trigger_status(&c, "readings", 0).await["handled"]["ok"]
            .as_u64()
            .is_some_and(|n| n > 100)
    })
    .await;
    c.kill();
    let count = || async { a.post("/fn/readings/count", "").await.json() };
    // Two cores for three hosts, NATS and the test: a wide deadline, set here.
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    loop {
        let seen = count().await["seen"].as_u64().unwrap_or(0);
        if seen == MESSAGES {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{seen} of {MESSAGES} messages handled after five minutes"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Handled twice: only what c had in hand when it died (a batch pulled
    // and the ones running), delivered again after ack_wait.
    let twice = count().await["twice"].as_u64().unwrap_or(0);
    eprintln!("handled twice: {twice}");
    assert!(twice <= 2 * INFLIGHT, "{twice} messages handled twice");
    let status = trigger_status(&a, "readings", 0).await;
    assert!(status["handled"]["dead_lettered"].is_null(), "{status}");
    assert!(
        status["handled"]["ok"].as_u64().is_some_and(|n| n > 0),
        "{status}"
    );
    drop(c);
}
