//! NATS message triggers: a function invoked once per message of a
//! JetStream stream.
//!
//! Each `[[triggers.nats]]` is one durable pull consumer, the same on every
//! host that serves the function, so each message goes to one host at a
//! time. A host works on up to `max_inflight` messages at once, each an
//! invocation with the message as its body. A `2xx` acknowledges the
//! message (and waits for NATS to confirm it); anything else, or no answer
//! within `ack_wait`, has it delivered again, after a growing pause; at
//! its `max_deliver`th failure it is published to `dead_letter` with the
//! error and terminated. A message no host has room for waits here up to
//! `ack_wait`, then is delivered again; that never dead-letters it. A message whose host died is delivered again
//! after `ack_wait`: at least once, never lost.
//!
//! The NATS is the key-value backend's (`--kv-backend nats`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_nats::HeaderMap as NatsHeaders;
use async_nats::jetstream::{self, AckKind, consumer::pull};
use bytes::Bytes;
use futures::StreamExt;
use http::{HeaderName, HeaderValue, header};
use tokio::task::JoinHandle;

use super::AppState;
use super::body::RequestBody;
use super::invoke::{self, Arrival};
use crate::triggers::{QueueRun, TRIGGER_HEADER, TRIGGER_ID_HEADER};
use lichen_core::triggers::NatsTrigger;

/// How often the consumers are matched against the policies in force.
const RECONCILE: Duration = Duration::from_secs(1);
/// The first pause before a failed message is delivered again; it
/// doubles with each delivery, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long a message waits before it is tried again when no host had
/// room for it; it doubles with each try, up to [`MAX_BUSY_PAUSE`].
const FIRST_BUSY_PAUSE: Duration = Duration::from_millis(10);
const MAX_BUSY_PAUSE: Duration = Duration::from_millis(100);
/// A consumer that failed (NATS down, no such stream) is made again after
/// this long.
const RETRY: Duration = Duration::from_secs(2);
/// The header naming where a message's answer is published.
pub const REPLY_HEADER: &str = "Lichen-Reply-To";
/// Headers of a dead letter.
pub const ERROR_HEADER: &str = "Lichen-Error";

/// The consumers this host runs, by function and trigger index.
struct Running {
    trigger: NatsTrigger,
    task: JoinHandle<()>,
}

/// The loop: until the host goes, one consumer task per NATS trigger of
/// the functions this host serves.
pub async fn run(state: Weak<AppState>) {
    let mut running: HashMap<(String, usize), Running> = HashMap::new();
    loop {
        {
            let Some(state) = state.upgrade() else {
                break;
            };
            reconcile(&state, &mut running);
        }
        tokio::time::sleep(RECONCILE).await;
    }
    for (_, consumer) in running {
        consumer.task.abort();
    }
}

fn reconcile(state: &Arc<AppState>, running: &mut HashMap<(String, usize), Running>) {
    let mut wanted: HashMap<(String, usize), NatsTrigger> = HashMap::new();
    for slot in state.functions.list() {
        let Ok(policy) = state.functions.policies.get(&slot.name) else {
            continue;
        };
        for (index, trigger) in policy.nats.iter().enumerate() {
            wanted.insert((slot.name.as_str().to_string(), index), trigger.clone());
        }
    }
    running.retain(|key, consumer| {
        let keep = wanted.get(key) == Some(&consumer.trigger) && !consumer.task.is_finished();
        if !keep {
            consumer.task.abort();
        }
        keep
    });
    for (key, trigger) in wanted {
        if running.contains_key(&key) {
            continue;
        }
        let task = tokio::spawn(consume(
            Arc::downgrade(state),
            key.0.clone(),
            key.1,
            trigger.clone(),
        ));
        running.insert(key, Running { trigger, task });
    }
}

/// Runs one consumer, making it again after a failure.
async fn consume(state: Weak<AppState>, function: String, index: usize, trigger: NatsTrigger) {
    loop {
        let outcome = {
            let Some(state) = state.upgrade() else {
                return;
            };
            let Some((js, _)) = state.functions.kv.nats_context() else {
                state.queues.failed(
                    &function,
                    index,
                    "NATS triggers take the NATS of the key-value backend: start the host with --kv-backend nats",
                );
                return;
            };
            serve(&state, js, &function, index, &trigger).await
        };
        if let Err(error) = outcome {
            tracing::warn!(function, trigger = index, error = %format!("{error:#}"), "NATS trigger failed; trying again");
            if let Some(state) = state.upgrade() {
                state.queues.failed(&function, index, &format!("{error:#}"));
            }
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// Pulls and handles messages until the consumer fails.
async fn serve(
    state: &Arc<AppState>,
    js: jetstream::Context,
    function: &str,
    index: usize,
    trigger: &NatsTrigger,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let stream = js
        .get_stream(&trigger.stream.0)
        .await
        .with_context(|| format!("the stream {:?}", trigger.stream.0))?;
    let durable = trigger.durable_name(function, index);
    let config = pull::Config {
        durable_name: Some(durable.clone()),
        filter_subject: trigger
            .subject
            .as_ref()
            .map(|s| s.0.clone())
            .unwrap_or_default(),
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        ack_wait: trigger.ack_wait.0,
        // Deliveries are counted here: the last one's failure is a dead
        // letter, and a host that died on it has it delivered again.
        max_deliver: -1,
        max_ack_pending: i64::from(trigger.max_inflight) * 64,
        ..Default::default()
    };
    // Made, or brought to this configuration (a policy edit changes it
    // for every host).
    let consumer: jetstream::consumer::Consumer<pull::Config> = stream
        .create_consumer(config)
        .await
        .with_context(|| format!("the consumer {durable:?} of {:?}", trigger.stream.0))?;
    state.queues.started(function, index, &durable);
    let inflight = trigger.max_inflight as usize;
    let messages = consumer
        .stream()
        .max_messages_per_batch(inflight)
        .messages()
        .await
        .context("pulling messages")?;
    // The consumer's lag, for the status page, while messages are handled.
    let mut watched = consumer.clone();
    let lag = async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if let Ok(info) = watched.info().await {
                state
                    .queues
                    .lag(function, index, info.num_pending, info.num_ack_pending);
            }
        }
    };
    let failed: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    let work = messages
        .take_while(|message| {
            let ok = message.is_ok();
            if let Err(error) = message {
                *failed.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(anyhow::anyhow!("the message stream broke: {error}"));
            }
            futures::future::ready(ok)
        })
        .for_each_concurrent(inflight, |message| async {
            if let Ok(message) = message {
                handle(state, &js, function, index, trigger, message).await;
            }
        });
    tokio::select! {
        () = work => {}
        never = lag => match never {},
    }
    match failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
        Some(error) => Err(error),
        None => Err(anyhow::anyhow!("the message stream ended")),
    }
}

/// One message: invoked, then acknowledged, delivered again or dead.
async fn handle(
    state: &Arc<AppState>,
    js: &jetstream::Context,
    function: &str,
    index: usize,
    trigger: &NatsTrigger,
    message: jetstream::Message,
) {
    let (stream, sequence, delivered) = match message.info() {
        Ok(info) => (
            info.stream.to_string(),
            info.stream_sequence,
            info.delivered,
        ),
        Err(_) => (trigger.stream.0.clone(), 0, 1),
    };
    let answer = tokio::select! {
        answer = invoke_with_room(state, function, trigger, &message, (&stream, sequence, delivered)) => answer,
        never = keep_alive(&message, trigger.ack_wait.0) => match never {},
    };
    let outcome = match &answer {
        // No host had room: not the message's failure, so never its last.
        Err(NoAnswer::Busy(_)) => {
            let pause = backoff(delivered);
            let _ = message.ack_with(AckKind::Nak(Some(pause))).await;
            "busy"
        }
        Ok((status, body)) if (200..300).contains(status) => {
            if let Some(reply) = reply_to(&message) {
                let _ = js.client().publish(reply, body.clone()).await;
            }
            match message.double_ack().await {
                Ok(()) => "ok",
                Err(error) => {
                    tracing::warn!(function, error = %error, "acknowledging a message failed; it will be delivered again");
                    "ack_failed"
                }
            }
        }
        _ if delivered >= i64::from(trigger.max_deliver) => {
            let error = match &answer {
                Ok((status, body)) => format!(
                    "{status}: {}",
                    String::from_utf8_lossy(&body[..body.len().min(512)])
                ),
                Err(NoAnswer::Busy(error) | NoAnswer::Failed(error)) => error.clone(),
            };
            if let Some(dead) = &trigger.dead_letter {
                let mut headers = NatsHeaders::new();
                headers.insert(ERROR_HEADER, error.as_str());
                headers.insert("Lichen-Function", function);
                headers.insert("Lichen-Stream", stream.as_str());
                headers.insert("Lichen-Stream-Sequence", sequence.to_string().as_str());
                headers.insert("Lichen-Subject", message.subject.as_str());
                headers.insert("Lichen-Deliveries", delivered.to_string().as_str());
                let published = js
                    .publish_with_headers(dead.0.clone(), headers, message.payload.clone())
                    .await;
                match published {
                    Ok(ack) => {
                        if let Err(error) = ack.await {
                            tracing::warn!(function, error = %error, "a dead letter was not confirmed");
                        }
                    }
                    Err(error) => {
                        tracing::warn!(function, error = %error, "publishing a dead letter failed");
                    }
                }
            }
            let _ = message.ack_with(AckKind::Term).await;
            "dead_lettered"
        }
        _ => {
            let pause = backoff(delivered);
            let _ = message.ack_with(AckKind::Nak(Some(pause))).await;
            "retried"
        }
    };
    let status = match &answer {
        Ok((status, _)) => *status,
        Err(_) => 0,
    };
    state.queues.ran(
        function,
        index,
        outcome,
        QueueRun {
            id: format!("{stream}/{sequence}"),
            subject: message.subject.to_string(),
            delivered,
            status,
            outcome,
            host: state.cluster().map_or("local", |c| c.node_id()).to_string(),
        },
    );
    state
        .functions
        .metrics
        .triggers
        .messages
        .with_label_values(&[function, &index.to_string(), outcome])
        .inc();
}

/// The pause before delivery `delivered + 1`.
fn backoff(delivered: i64) -> Duration {
    let doublings = u32::try_from(delivered.saturating_sub(1).clamp(0, 16)).unwrap_or(16);
    FIRST_BACKOFF
        .saturating_mul(1 << doublings)
        .min(MAX_BACKOFF)
}

/// Tells NATS the message is still being worked on, every half `ack_wait`.
async fn keep_alive(message: &jetstream::Message, ack_wait: Duration) -> std::convert::Infallible {
    let mut every = tokio::time::interval(ack_wait / 2);
    every.tick().await;
    loop {
        every.tick().await;
        let _ = message.ack_with(AckKind::Progress).await;
    }
}

fn reply_to(message: &jetstream::Message) -> Option<async_nats::Subject> {
    let value = message.headers.as_ref()?.get(REPLY_HEADER)?;
    let subject = value.as_str();
    // Never the server's own subjects ($JS, $KV: the registry's bucket
    // among them) or inboxes: whoever publishes to the stream sets this.
    let own = subject.starts_with('$') || subject.starts_with("_INBOX");
    (!subject.is_empty() && !own).then(|| async_nats::Subject::from(subject))
}

/// Why an invocation gave no answer.
enum NoAnswer {
    /// Refused before it ran: no room on this host or its peers.
    Busy(String),
    /// It ran and broke off, or was refused for another reason.
    Failed(String),
}

/// [`invoke_with`], tried again while the host (and every peer) is too
/// busy to run it, for up to `ack_wait` (the message is kept alive).
async fn invoke_with_room(
    state: &Arc<AppState>,
    function: &str,
    trigger: &NatsTrigger,
    message: &jetstream::Message,
    delivery: (&str, u64, i64),
) -> Result<(u16, Bytes), NoAnswer> {
    let give_up = tokio::time::Instant::now() + trigger.ack_wait.0;
    let mut pause = FIRST_BUSY_PAUSE;
    loop {
        match invoke_with(state, function, trigger, message, delivery).await {
            Err(NoAnswer::Busy(_)) if tokio::time::Instant::now() < give_up => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MAX_BUSY_PAUSE);
            }
            answer => return answer,
        }
    }
}

/// Invokes the function with `message`; its status and body, or why it
/// did not answer.
async fn invoke_with(
    state: &Arc<AppState>,
    function: &str,
    trigger: &NatsTrigger,
    message: &jetstream::Message,
    (stream, sequence, delivered): (&str, u64, i64),
) -> Result<(u16, Bytes), NoAnswer> {
    let body = message.payload.clone();
    let mut req = hyper::Request::new(RequestBody::from(body.clone()));
    *req.method_mut() = trigger.method.0.clone();
    let path = &trigger.path.0;
    if let Ok(uri) = format!("/fn/{function}{path}").parse() {
        *req.uri_mut() = uri;
    }
    let headers = req.headers_mut();
    if let Some(nats) = &message.headers {
        for (name, values) in nats.iter() {
            let name = format!("x-nats-{}", name.to_string().to_ascii_lowercase());
            let Ok(name) = HeaderName::from_bytes(name.as_bytes()) else {
                continue;
            };
            for value in values {
                if let Ok(value) = HeaderValue::from_str(value.as_str()) {
                    headers.append(name.clone(), value);
                }
            }
        }
    }
    let mut set = |name: &'static str, value: String| {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    };
    set("x-nats-subject", message.subject.to_string());
    set("x-nats-stream", stream.to_string());
    set("x-nats-stream-sequence", sequence.to_string());
    set("x-nats-delivered", delivered.to_string());
    set(TRIGGER_ID_HEADER, format!("{stream}/{sequence}"));
    headers.insert(TRIGGER_HEADER, HeaderValue::from_static("nats"));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    let request_id = state.next_request_id();
    let rest = path.strip_prefix('/').unwrap_or(path);
    let rest = rest.split_once('?').map_or(rest, |(path, _)| path);
    match invoke::invoke(
        state,
        req,
        (function, rest),
        &request_id,
        Arrival::Trigger(body),
    )
    .await
    {
        Ok(response) => {
            let status = response.status().as_u16();
            let body = http_body_util::BodyExt::collect(response.into_body())
                .await
                .map(|b| b.to_bytes())
                .map_err(|e| NoAnswer::Failed(format!("the response broke off: {e}")))?;
            Ok((status, body))
        }
        Err(error) => {
            let reason = format!(
                "{} {}: {}",
                error.status.as_u16(),
                error.code,
                error.message
            );
            Err(if error.code == "busy" {
                NoAnswer::Busy(reason)
            } else {
                NoAnswer::Failed(reason)
            })
        }
    }
}
