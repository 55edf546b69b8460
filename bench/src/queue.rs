//! The NATS side of `lichen-bench queue`: the stream, a native consumer to
//! compare with, publishing and waiting until every message is
//! acknowledged.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use async_nats::jetstream::{self, consumer::pull};
use futures::StreamExt;

/// The stream `BENCH` (subjects `bench.>`) on the NATS at `url`.
pub async fn stream(url: &str) -> Result<jetstream::Context> {
    let client = async_nats::connect(url)
        .await
        .context("connecting to NATS")?;
    let js = jetstream::new(client);
    js.create_stream(jetstream::stream::Config {
        name: "BENCH".to_string(),
        subjects: vec!["bench.>".to_string()],
        ..Default::default()
    })
    .await
    .context("creating the stream")?;
    Ok(js)
}

/// The durable consumer a host made, once it exists.
pub async fn wait_for_consumer(
    js: &jetstream::Context,
    durable: &str,
) -> Result<jetstream::consumer::Consumer<pull::Config>> {
    let stream = js.get_stream("BENCH").await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(consumer) = stream.get_consumer(durable).await {
            return Ok(consumer);
        }
        if Instant::now() > deadline {
            bail!("no consumer {durable} within a minute");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A pull consumer in this process that acknowledges each message (waiting
/// for NATS to confirm, as the host does), `inflight` at once.
pub async fn native_consumer(
    js: &jetstream::Context,
    inflight: usize,
) -> Result<jetstream::consumer::Consumer<pull::Config>> {
    let stream = js.get_stream("BENCH").await?;
    let config = pull::Config {
        durable_name: Some("native".to_string()),
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        max_ack_pending: inflight as i64 * 64,
        ..Default::default()
    };
    let consumer = stream.get_or_create_consumer("native", config).await?;
    let messages = consumer
        .stream()
        .max_messages_per_batch(inflight)
        .messages()
        .await?;
    tokio::spawn(
        messages.for_each_concurrent(inflight, |message| async move {
            if let Ok(message) = message {
                let _ = message.double_ack().await;
            }
        }),
    );
    Ok(consumer)
}

/// Publishes `messages` and returns how long until `consumer` has
/// acknowledged them all.
pub async fn publish_and_drain(
    js: &jetstream::Context,
    mut consumer: jetstream::consumer::Consumer<pull::Config>,
    messages: u64,
) -> Result<Duration> {
    let started = Instant::now();
    for round in 0..messages.div_ceil(500) {
        let mut acks = Vec::new();
        for i in round * 500..((round + 1) * 500).min(messages) {
            acks.push(
                js.publish(format!("bench.{}", i % 16), format!("{i}").into())
                    .await?,
            );
        }
        for ack in acks {
            ack.await?;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let info = consumer.info().await?;
        if info.ack_floor.stream_sequence >= messages {
            return Ok(started.elapsed());
        }
        if Instant::now() > deadline {
            bail!(
                "{} of {messages} acknowledged after ten minutes",
                info.ack_floor.stream_sequence
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
