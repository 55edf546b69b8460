//! Cron triggers: a function invoked on its policy's schedules, each tick
//! once per cluster.
//!
//! Every host runs one loop over the functions it serves. A tick becomes
//! due at its time; the hosts serving the function take their turns at it
//! one takeover step apart, in the order of [`Tick::weight`], and the first
//! whose turn comes without a claim known for the tick claims it
//! ([`crate::cluster::claims`]) and, if no peer refuses, invokes the
//! function. A host that is down is passed over one step later, so a tick
//! is run late rather than skipped (as is one whose claimer released it); a tick nobody ran within
//! [`MAX_LATE`] is given up. A host on its own runs every tick itself.
//!
//! Each invocation is a `POST` (or the trigger's method) to the trigger's
//! path with `x-lichen-trigger: cron` and `x-lichen-trigger-id:
//! FUNCTION/INDEX/TIME`, so a guest can make its work idempotent.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use hyper::body::Incoming;
use jiff::{SignedDuration, Timestamp};
use lichen_core::seal::{self, Signed};

use super::body::{RequestBody, read_capped};
use super::invoke::{self, Arrival};
use super::{AppState, auth, json};
use crate::cluster::claims::{ClaimMessage, MAX_CLAIM_BYTES, Tick};
use crate::error::{ApiError, Body};
use crate::names::FunctionName;
use crate::triggers::{Run, TRIGGER_HEADER, TRIGGER_ID_HEADER};
use lichen_core::triggers::CronTrigger;

/// A tick nobody ran this long after its time is given up.
pub const MAX_LATE: Duration = Duration::from_secs(10 * 60);
/// A tick a peer claimed is kept this long after its time: a peer that
/// cannot take the tick's lease releases it (within
/// [`crate::cluster::claims::LEASE_WAIT`]), and the next host in turn
/// claims it then.
const RELEASED_WITHIN: Duration = Duration::from_secs(60);
/// The longest the loop sleeps: policies and members are looked at again.
const MAX_NAP: Duration = Duration::from_millis(250);
/// Ticks of one trigger taken up in one pass; more (a host paused for
/// long) are given up but the latest.
const MAX_TICKS_PER_PASS: usize = 64;

/// What the loop knows of one trigger.
struct Cursor {
    /// The trigger as it was when its cursor was set: a changed schedule
    /// starts again from now.
    trigger: CronTrigger,
    /// Ticks up to here are taken up.
    through: Timestamp,
}

/// A tick waiting for this host's turn.
struct Due {
    tick: Tick,
    at: Timestamp,
}

/// The loop: until the host goes.
pub async fn run(state: Weak<AppState>) {
    let mut cursors: HashMap<(String, u32), Cursor> = HashMap::new();
    let mut due: Vec<Due> = Vec::new();
    let mut joined: Option<Instant> = None;
    loop {
        let nap = {
            let Some(state) = state.upgrade() else {
                return;
            };
            // A clustered host takes its turns once it has heard from its
            // peers for a while: until then it may not know who else
            // serves a function, and would claim out of turn.
            let settled = match state.cluster() {
                None => true,
                Some(cluster) if cluster.joined() => {
                    let since = *joined.get_or_insert_with(Instant::now);
                    since.elapsed() >= takeover_step(&state).unsigned_abs() * 2
                }
                Some(_) => false,
            };
            pass(&state, settled, &mut cursors, &mut due)
        };
        tokio::time::sleep(nap).await;
    }
}

/// One pass: takes up the ticks that came, acts on those whose turn it is
/// here; returns how long to sleep.
fn pass(
    state: &Arc<AppState>,
    settled: bool,
    cursors: &mut HashMap<(String, u32), Cursor>,
    due: &mut Vec<Due>,
) -> Duration {
    let now = Timestamp::now();
    let mut wake = later(now, SignedDuration::try_from(MAX_NAP).unwrap_or_default());
    let mut seen = HashSet::new();
    for slot in state.functions.list() {
        let Ok(policy) = state.functions.policies.get(&slot.name) else {
            continue;
        };
        for (index, trigger) in policy.cron.iter().enumerate() {
            let key = (slot.name.as_str().to_string(), index as u32);
            seen.insert(key.clone());
            let cursor = cursors.entry(key.clone()).or_insert_with(|| Cursor {
                trigger: trigger.clone(),
                through: now,
            });
            if cursor.trigger != *trigger {
                *cursor = Cursor {
                    trigger: trigger.clone(),
                    through: now,
                };
            }
            let mut taken = Vec::new();
            while let Some(next) = cursor.trigger.next_after(cursor.through) {
                if next > now {
                    wake = wake.min(next);
                    break;
                }
                cursor.through = next;
                taken.push(next);
            }
            if !settled {
                continue;
            }
            let skipped = taken.len().saturating_sub(MAX_TICKS_PER_PASS);
            if skipped > 0 {
                missed(state, &key, skipped as u64);
            }
            for at in taken.into_iter().skip(skipped) {
                due.push(Due {
                    tick: Tick {
                        function: key.0.clone(),
                        trigger: key.1,
                        at_ms: at.as_millisecond(),
                    },
                    at,
                });
            }
        }
    }
    cursors.retain(|key, _| seen.contains(key));
    let step = takeover_step(state);
    due.retain(|d| {
        let key = (d.tick.function.clone(), d.tick.trigger);
        if !cursors.contains_key(&key) {
            return false;
        }
        let late = now.duration_since(d.at);
        if state.cluster().is_some_and(|c| c.tick_claimed(&d.tick)) {
            // A peer's: kept a while, in case it releases the tick.
            return late.unsigned_abs() < RELEASED_WITHIN;
        }
        if late.unsigned_abs() > MAX_LATE {
            missed(state, &key, 1);
            return false;
        }
        let turn = later(
            d.at,
            step.checked_mul(turn_of(state, &d.tick))
                .unwrap_or(SignedDuration::MAX),
        );
        if turn > now {
            wake = wake.min(turn);
            return true;
        }
        let state = Arc::clone(state);
        let tick = d.tick.clone();
        let at = d.at;
        tokio::spawn(async move { claim_and_run(&state, tick, at, step).await });
        false
    });
    let nap = now.duration_until(wake).unsigned_abs();
    nap.clamp(Duration::from_millis(1), MAX_NAP)
}

/// Counts `ticks` of a trigger given up.
fn missed(state: &AppState, (function, index): &(String, u32), ticks: u64) {
    state
        .functions
        .metrics
        .triggers
        .missed
        .with_label_values(&[function.as_str(), &index.to_string()])
        .inc_by(ticks);
}

/// How far apart the hosts' turns at a tick are: a few gossip rounds,
/// well under the failure detector's interval (about ten rounds).
fn takeover_step(state: &AppState) -> SignedDuration {
    let interval = state.cluster().map_or(Duration::ZERO, |c| c.interval());
    let step = (interval * 5).max(Duration::from_millis(500));
    SignedDuration::try_from(step).unwrap_or(SignedDuration::from_secs(1))
}

/// `t` moved on by `by`, or the end of time.
fn later(t: Timestamp, by: SignedDuration) -> Timestamp {
    t.saturating_add(by).unwrap_or(Timestamp::MAX)
}

/// This host's place among the live hosts serving the tick's function, by
/// the tick's weights (0 first).
fn turn_of(state: &AppState, tick: &Tick) -> i32 {
    let Some(cluster) = state.cluster() else {
        return 0;
    };
    let own = tick.weight(cluster.node_id());
    let ahead = cluster
        .peers()
        .iter()
        .filter(|p| p.serving(&tick.function).is_some())
        .filter(|p| tick.weight(&p.node_id) > own)
        .count();
    i32::try_from(ahead).unwrap_or(i32::MAX)
}

async fn claim_and_run(state: &Arc<AppState>, tick: Tick, at: Timestamp, step: SignedDuration) {
    if let Some(cluster) = state.cluster() {
        let wait = step.unsigned_abs().min(Duration::from_secs(2));
        if !cluster.claim_tick(&tick, wait).await {
            return;
        }
    }
    let Ok(name) = FunctionName::new(&tick.function) else {
        return;
    };
    let Ok(policy) = state.functions.policies.get(&name) else {
        return;
    };
    let Some(trigger) = policy.cron.get(tick.trigger as usize) else {
        return;
    };
    let started = Timestamp::now();
    let status = fire(state, &tick, at, trigger).await;
    let outcome = if (200..300).contains(&status) {
        "ok"
    } else {
        "error"
    };
    state
        .functions
        .metrics
        .triggers
        .runs
        .with_label_values(&[tick.function.as_str(), &tick.trigger.to_string(), outcome])
        .inc();
    let host = state.cluster().map_or("local", |c| c.node_id()).to_string();
    tracing::info!(function = %tick.function, trigger = tick.trigger, tick = %at, status, "cron tick ran");
    state.cron.note(
        &tick.function,
        tick.trigger,
        Run {
            tick: at.to_string(),
            ran: started.to_string(),
            host,
            status,
            late_ms: started.duration_since(at).as_millis().max(0) as u64,
        },
    );
}

/// What the guest is told of the tick: `FUNCTION/INDEX/TIME`.
fn trigger_id(tick: &Tick, at: Timestamp) -> String {
    format!("{}/{}/{at}", tick.function, tick.trigger)
}

/// Invokes `trigger` for `tick` on this host (a peer if this one is full);
/// returns the answer's status.
pub async fn fire(state: &Arc<AppState>, tick: &Tick, at: Timestamp, trigger: &CronTrigger) -> u16 {
    let body = Bytes::from(trigger.body_bytes().unwrap_or_default());
    let mut req = hyper::Request::new(RequestBody::from(body.clone()));
    *req.method_mut() = trigger.method.0.clone();
    let path = &trigger.path.0;
    if let Ok(uri) = format!("/fn/{}{path}", tick.function).parse() {
        *req.uri_mut() = uri;
    }
    let headers = req.headers_mut();
    if trigger.body.is_some() {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    headers.insert(TRIGGER_HEADER, HeaderValue::from_static("cron"));
    if let Ok(value) = HeaderValue::from_str(&trigger_id(tick, at)) {
        headers.insert(TRIGGER_ID_HEADER, value);
    }
    let request_id = state.next_request_id();
    let rest = path.strip_prefix('/').unwrap_or(path);
    let rest = rest.split_once('?').map_or(rest, |(path, _)| path);
    let arrival = Arrival::Trigger(body);
    match invoke::invoke(
        state,
        req,
        (tick.function.as_str(), rest),
        &request_id,
        arrival,
    )
    .await
    {
        Ok(response) => {
            let status = response.status().as_u16();
            // The body is read (and dropped) so a streaming guest finishes.
            let _ = http_body_util::BodyExt::collect(response.into_body()).await;
            status
        }
        Err(error) => error.status.as_u16(),
    }
}

/// `POST /v1/internal/cron-claims`: a peer's claim of a tick, its body
/// signed with the request.
pub async fn receive_claim(
    state: &AppState,
    signed: &Signed,
    req: hyper::Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let Some(cluster) = state.cluster() else {
        return Err(ApiError::not_found("this host is not in a cluster"));
    };
    let idle = state.limits().body_idle_timeout;
    let bytes = read_capped(req, MAX_CLAIM_BYTES as u64, idle).await?;
    if let Err(refusal) = seal::check_body(signed, &bytes) {
        cluster.note_refused(refusal);
        return Err(auth::refused(refusal));
    }
    let claim: ClaimMessage = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request("invalid_claim", e.to_string()))?;
    json(StatusCode::OK, &cluster.receive_claim(&claim))
}

/// `POST /v1/functions/{name}/triggers/{index}/run`: fires a trigger now,
/// on this host, outside its schedule; answers the invocation's status and
/// the id the guest was given.
pub async fn run_now(
    state: &Arc<AppState>,
    name: &FunctionName,
    index: &str,
) -> Result<Response<Body>, ApiError> {
    let policy = invoke::policy_of(state, name)?;
    let trigger = index
        .parse::<u32>()
        .ok()
        .and_then(|i| Some((i, policy.cron.get(i as usize)?)));
    let Some((index, trigger)) = trigger else {
        return Err(ApiError::not_found(format!(
            "{name} has no trigger {index:?}; its policy has {} cron trigger(s), numbered from 0",
            policy.cron.len()
        )));
    };
    let now = Timestamp::now();
    let tick = Tick {
        function: name.as_str().to_string(),
        trigger: index,
        at_ms: now.as_millisecond(),
    };
    let status = fire(state, &tick, now, trigger).await;
    let host = state.cluster().map_or("local", |c| c.node_id()).to_string();
    state.cron.note(
        name.as_str(),
        index,
        Run {
            tick: now.to_string(),
            ran: now.to_string(),
            host,
            status,
            late_ms: 0,
        },
    );
    json(
        StatusCode::OK,
        &serde_json::json!({
            "function": name.as_str(),
            "trigger": index,
            "id": trigger_id(&tick, now),
            "status": status,
        }),
    )
}
