//! What a host keeps of its functions' triggers: their counters and the
//! latest runs the status page shows. The loop that fires cron triggers is
//! `api::cron`; who runs a tick in a cluster is `cluster::claims`.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use jiff::Timestamp;
use prometheus::{IntCounterVec, Opts, Registry};
use serde::Serialize;

use lichen_core::triggers::{CronTrigger, NatsTrigger};

/// Header naming what invoked a function (`cron`).
pub const TRIGGER_HEADER: &str = "x-lichen-trigger";
/// Header naming the tick: `FUNCTION/INDEX/TIME` (RFC 3339, UTC).
pub const TRIGGER_ID_HEADER: &str = "x-lichen-trigger-id";
/// Runs remembered per trigger, for the status page.
const RUNS_KEPT: usize = 10;
/// Counters of cron triggers.
#[derive(Clone)]
pub struct TriggerMetrics {
    /// Ticks run by this host, by function, trigger and outcome (`ok`:
    /// a 2xx, `error`: anything else).
    pub runs: IntCounterVec,
    /// Ticks given up: nobody ran them within ten minutes, as this host
    /// saw it.
    pub missed: IntCounterVec,
    /// Messages of NATS triggers this host handled, by function, trigger
    /// and outcome.
    pub messages: IntCounterVec,
    /// Claims this host made, by outcome (`won`, `lost`,
    /// `lease_unavailable`).
    pub claims: IntCounterVec,
}

impl TriggerMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let metrics = TriggerMetrics {
            runs: IntCounterVec::new(
                Opts::new(
                    "lichen_trigger_runs_total",
                    "Cron ticks this host ran, by function, trigger index and outcome (ok: a 2xx answer, error: anything else).",
                ),
                &["function", "trigger", "outcome"],
            )?,
            missed: IntCounterVec::new(
                Opts::new(
                    "lichen_trigger_missed_total",
                    "Cron ticks given up because no host ran them within ten minutes, as this host saw it.",
                ),
                &["function", "trigger"],
            )?,
            messages: IntCounterVec::new(
                Opts::new(
                    "lichen_trigger_messages_total",
                    "Messages of NATS triggers this host handled, by function, trigger index and outcome (ok: a 2xx, acknowledged; retried: delivered again later; busy: no host had room, delivered again later and never dead-lettered; dead_lettered: failed its last delivery; ack_failed: NATS did not confirm the acknowledgement).",
                ),
                &["function", "trigger", "outcome"],
            )?,
            claims: IntCounterVec::new(
                Opts::new(
                    "lichen_trigger_claims_total",
                    "Claims of cron ticks this host made, by outcome (won: it ran the tick, lost: another host holds it, lease_unavailable: NATS did not give the lease, so it did not run).",
                ),
                &["outcome"],
            )?,
        };
        registry.register(Box::new(metrics.runs.clone()))?;
        registry.register(Box::new(metrics.missed.clone()))?;
        registry.register(Box::new(metrics.claims.clone()))?;
        registry.register(Box::new(metrics.messages.clone()))?;
        Ok(metrics)
    }

    pub fn forget_function(&self, function: &str, triggers: usize) {
        for index in 0..triggers {
            let index = index.to_string();
            for outcome in ["ok", "error"] {
                let _ = self.runs.remove_label_values(&[function, &index, outcome]);
            }
            let _ = self.missed.remove_label_values(&[function, &index]);
        }
    }
}

/// One run of a tick, for the status page.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    /// The tick's time (RFC 3339).
    pub tick: String,
    /// When it ran (RFC 3339).
    pub ran: String,
    pub host: String,
    pub status: u16,
    /// How late after its tick it started, in milliseconds.
    pub late_ms: u64,
}

/// A trigger as the status page shows it.
#[derive(Debug, Clone, Serialize)]
pub struct TriggerStatus {
    pub index: u32,
    pub kind: &'static str,
    pub schedule: String,
    pub timezone: String,
    pub path: String,
    /// The next tick (RFC 3339).
    pub next: Option<String>,
    /// The latest runs by this host, newest first.
    pub runs: Vec<Run>,
}

/// The cron state of one host.
#[derive(Default)]
pub struct Cron {
    runs: Mutex<HashMap<(String, u32), VecDeque<Run>>>,
}

impl Cron {
    /// The triggers of `function` as its policy has them, with this host's
    /// latest runs.
    pub fn status(&self, function: &str, triggers: &[CronTrigger]) -> Vec<TriggerStatus> {
        let runs = self.runs.lock().unwrap_or_else(|e| e.into_inner());
        let now = Timestamp::now();
        triggers
            .iter()
            .enumerate()
            .map(|(index, trigger)| {
                let index = index as u32;
                TriggerStatus {
                    index,
                    kind: "cron",
                    schedule: trigger.schedule.0.clone(),
                    timezone: trigger.timezone.0.clone(),
                    path: trigger.path.0.clone(),
                    next: trigger.next_after(now).map(|t| t.to_string()),
                    runs: runs
                        .get(&(function.to_string(), index))
                        .map(|runs| runs.iter().cloned().collect())
                        .unwrap_or_default(),
                }
            })
            .collect()
    }

    /// Keeps `run` of trigger `index` of `function` among its latest.
    pub fn note(&self, function: &str, index: u32, run: Run) {
        let mut runs = self.runs.lock().unwrap_or_else(|e| e.into_inner());
        let kept = runs.entry((function.to_string(), index)).or_default();
        kept.push_front(run);
        kept.truncate(RUNS_KEPT);
    }
}

/// One message handled by this host, for the status page.
#[derive(Debug, Clone, Serialize)]
pub struct QueueRun {
    /// `STREAM/SEQUENCE`.
    pub id: String,
    pub subject: String,
    /// Which delivery of the message this was (1: the first).
    pub delivered: i64,
    /// The invocation's status (0: it did not answer).
    pub status: u16,
    /// `ok`, `retried`, `busy`, `dead_lettered` or `ack_failed`.
    pub outcome: &'static str,
    pub host: String,
}

/// A NATS trigger as the status page shows it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct QueueStatus {
    pub index: u32,
    pub kind: &'static str,
    pub stream: String,
    pub subject: Option<String>,
    pub durable: String,
    /// Whether this host's consumer is pulling messages.
    pub consuming: bool,
    /// Why it is not, if it failed.
    pub error: Option<String>,
    /// Messages of the stream not yet delivered to the consumer, and
    /// delivered but not yet acknowledged, as NATS last said.
    pub pending: u64,
    pub ack_pending: usize,
    /// Messages this host handled, by outcome.
    pub handled: HashMap<&'static str, u64>,
    /// The latest messages this host handled, newest first.
    pub runs: Vec<QueueRun>,
}

/// The NATS triggers of one host.
#[derive(Default)]
pub struct Queues {
    by_trigger: Mutex<HashMap<(String, usize), QueueStatus>>,
}

impl Queues {
    fn with(&self, function: &str, index: usize, change: impl FnOnce(&mut QueueStatus)) {
        let mut all = self.by_trigger.lock().unwrap_or_else(|e| e.into_inner());
        let status = all
            .entry((function.to_string(), index))
            .or_insert_with(|| QueueStatus {
                index: index as u32,
                kind: "nats",
                ..QueueStatus::default()
            });
        change(status);
    }

    pub fn started(&self, function: &str, index: usize, durable: &str) {
        self.with(function, index, |s| {
            s.consuming = true;
            s.error = None;
            s.durable = durable.to_string();
        });
    }

    pub fn failed(&self, function: &str, index: usize, error: &str) {
        self.with(function, index, |s| {
            s.consuming = false;
            s.error = Some(error.to_string());
        });
    }

    pub fn lag(&self, function: &str, index: usize, pending: u64, ack_pending: usize) {
        self.with(function, index, |s| {
            s.pending = pending;
            s.ack_pending = ack_pending;
        });
    }

    pub fn ran(&self, function: &str, index: usize, outcome: &'static str, run: QueueRun) {
        self.with(function, index, |s| {
            *s.handled.entry(outcome).or_insert(0) += 1;
            s.runs.insert(0, run);
            s.runs.truncate(RUNS_KEPT);
        });
    }

    /// The NATS triggers of `function` as its policy has them.
    pub fn status(&self, function: &str, triggers: &[NatsTrigger]) -> Vec<QueueStatus> {
        let all = self.by_trigger.lock().unwrap_or_else(|e| e.into_inner());
        triggers
            .iter()
            .enumerate()
            .map(|(index, trigger)| {
                let mut status = all
                    .get(&(function.to_string(), index))
                    .cloned()
                    .unwrap_or_else(|| QueueStatus {
                        index: index as u32,
                        kind: "nats",
                        ..QueueStatus::default()
                    });
                status.stream = trigger.stream.0.clone();
                status.subject = trigger.subject.as_ref().map(|s| s.0.clone());
                status.durable = trigger.durable_name(function, index);
                status
            })
            .collect()
    }
}
