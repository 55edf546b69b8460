//! Prometheus metrics, from a registry the host owns (not the crate's global
//! one, so several hosts in one process, as in tests, never mix figures).
//!
//! Names follow Prometheus conventions: the `lichen_` prefix, base units
//! (seconds, bytes), `_total` for counters. Label values are bounded: the
//! only free-form label is `function`, and it only ever holds names of
//! deployed functions (a request for an unknown one is counted without a
//! label), and a deleted function's series are removed. Gauges that mirror
//! state (in flight, queued, function count) are set when scraped, so the
//! invocation path does not pay for them.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Result;
use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::engine::Outcome;
use crate::kv::KvMetrics;
use crate::outbound::OutboundMetrics;
use crate::sandbox::Handoff;
use lichen_core::seal::{Refused, Rejected};

/// Buckets from 50 µs (an instantiate + call of a tiny function) to 30 s
/// (a long deadline).
const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0,
];

/// Every outcome label value, so a deleted function's series can all go.
const OUTCOMES: &[Outcome] = &[
    Outcome::Ok,
    Outcome::GuestError,
    Outcome::Trap,
    Outcome::Timeout,
    Outcome::Rejected,
    Outcome::Denied,
    Outcome::Forwarded,
    Outcome::ForwardFailed,
];

/// The `event` label values of `lichen_instances_total`.
pub const INSTANCE_EVENTS: [&str; 3] = ["created", "reused", "retired"];

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub invocations: IntCounterVec,
    pub invocation_duration: HistogramVec,
    pub instantiate_duration: HistogramVec,
    pub inflight: IntGaugeVec,
    pub queued: IntGaugeVec,
    pub memory_peak: IntGaugeVec,
    /// Outbound requests a policy denied, per function.
    pub outbound_denied: IntCounterVec,
    /// Responses cut off at the policy's `response_body` limit, per function.
    pub responses_cut: IntCounterVec,
    /// Instances of functions that reuse them: created, reused (a request
    /// served by an instance that had served one before) and retired.
    pub instances: IntCounterVec,
    /// Invocations whose guest ran on another task than its request's: it
    /// was still writing its body after the head, or it joined an instance
    /// another request was driving.
    pub handoffs: IntCounterVec,
    /// Key-value operations and stores.
    pub kv: KvMetrics,
    /// Guests' outbound HTTP.
    pub outbound: OutboundMetrics,
    /// Cron triggers: runs, ticks given up, claims.
    pub triggers: crate::triggers::TriggerMetrics,
    /// Invocations of functions that do not exist (no label: unbounded names).
    pub unknown_function: IntCounter,
    /// Compilations from WebAssembly to machine code, with their durations.
    pub compile_duration: Histogram,
    /// Functions whose compiled code came from the cache instead.
    pub cache_loads: IntCounter,
    pub deploys: IntCounterVec,
    pub functions: IntGauge,
    /// Policy files that failed to load (the last good one stayed).
    pub policy_reload_errors: IntCounter,
    /// Reloads of the TLS certificate and key, by outcome (`ok`, `error`:
    /// the previous pair stayed in service).
    pub tls_reloads: IntCounterVec,
    /// Peers the failure detector holds alive (this host not counted).
    pub peers_alive: IntGauge,
    /// Invocations a peer ran for this host, by function and peer node id.
    pub forwarded: IntCounterVec,
    /// Forwards that failed (connection, peer error, timeout).
    pub forward_failures: IntCounter,
    /// Modules fetched from peers, by outcome.
    pub module_fetches: IntCounterVec,
    /// Changes to one function made on two hosts without seeing each other.
    pub registry_conflicts: IntCounter,
    /// Entries of the registry on NATS refused: not sealed under the
    /// cluster's secret (written by whoever can write NATS, not a host).
    pub registry_rejected: IntCounter,
    /// Registry entries that failed to apply here, by function.
    pub registry_apply_failures: IntCounterVec,
    /// Each live peer's wall clock minus this host's, in seconds.
    pub peer_clock_offset: GaugeVec,
    /// Gossip datagrams dropped unread, by reason (`lichen_core::seal`, or
    /// [`UNDECODABLE`]).
    pub gossip_rejected: IntCounterVec,
    /// Internal requests refused, by code (their `401` codes).
    pub peer_requests_refused: IntCounterVec,
    /// `lichen_clock_ahead_refused_total{source}`.
    pub clock_ahead_refused: IntCounterVec,
    /// `lichen_gossip_custody{kind}`.
    pub gossip_custody: IntGaugeVec,
}

/// One function's series, each looked up the first time it is used (so
/// `/metrics` lists what happened, as with lookups per request) and held
/// from then on.
pub struct FunctionMetrics {
    metrics: Metrics,
    name: Arc<str>,
    invocations: [OnceLock<IntCounter>; OUTCOMES.len()],
    duration: OnceLock<Histogram>,
    instantiate: OnceLock<Histogram>,
    memory_peak: OnceLock<IntGauge>,
    responses_cut: OnceLock<IntCounter>,
    outbound_denied: OnceLock<IntCounter>,
    handoffs: [OnceLock<IntCounter>; 2],
    instances: [OnceLock<IntCounter>; INSTANCE_EVENTS.len()],
}

impl FunctionMetrics {
    /// The function's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn child<'a, T: Clone>(
        &self,
        cell: &'a OnceLock<T>,
        vec: &prometheus::core::MetricVec<impl prometheus::core::MetricVecBuilder<M = T>>,
        extra: Option<&str>,
    ) -> &'a T {
        cell.get_or_init(|| match extra {
            Some(extra) => vec.with_label_values(&[&*self.name, extra]),
            None => vec.with_label_values(&[&*self.name]),
        })
    }

    /// Records one finished invocation.
    pub fn record_invocation(
        &self,
        outcome: Outcome,
        duration: Duration,
        instantiate: Option<Duration>,
        memory_peak: usize,
    ) {
        let m = &self.metrics;
        let index = OUTCOMES.iter().position(|o| *o == outcome).unwrap_or(0);
        self.child(
            &self.invocations[index],
            &m.invocations,
            Some(outcome.as_str()),
        )
        .inc();
        self.child(&self.duration, &m.invocation_duration, None)
            .observe(duration.as_secs_f64());
        if let Some(instantiate) = instantiate {
            self.child(&self.instantiate, &m.instantiate_duration, None)
                .observe(instantiate.as_secs_f64());
        }
        self.record_memory_peak(memory_peak);
    }

    /// Raises the memory high-water mark to `peak` if above.
    pub fn record_memory_peak(&self, peak: usize) {
        if peak > 0 {
            let gauge = self.child(&self.memory_peak, &self.metrics.memory_peak, None);
            let peak = i64::try_from(peak).unwrap_or(i64::MAX);
            if peak > gauge.get() {
                gauge.set(peak);
            }
        }
    }

    pub fn response_cut(&self) {
        self.child(&self.responses_cut, &self.metrics.responses_cut, None)
            .inc();
    }

    pub fn outbound_denied(&self) {
        self.child(&self.outbound_denied, &self.metrics.outbound_denied, None)
            .inc();
    }

    /// Counts a guest that ran on another task than its request's.
    pub fn handed_off(&self, handoff: Handoff) {
        let index = handoff as usize - 1;
        let vec = &self.metrics.handoffs;
        self.child(&self.handoffs[index], vec, Some(handoff.as_str()))
            .inc();
    }

    /// Counts an instance event (`created`, `reused`, `retired`).
    pub fn instance(&self, event: &'static str) {
        let index = INSTANCE_EVENTS
            .iter()
            .position(|e| *e == event)
            .unwrap_or(0);
        self.child(&self.instances[index], &self.metrics.instances, Some(event))
            .inc();
    }
}

/// Why a gossip datagram that opened was dropped all the same: it is not a
/// chitchat message (sealed by a holder of the secret: another version).
pub const UNDECODABLE: &str = "undecodable";

impl Metrics {
    pub fn new() -> Result<Self> {
        let registry = Registry::new();
        let function = &["function"];
        let invocations = IntCounterVec::new(
            Opts::new(
                "lichen_invocations_total",
                "Invocations by function and outcome (ok, guest_error, trap, timeout, rejected, denied).",
            ),
            &["function", "outcome"],
        )?;
        let invocation_duration = HistogramVec::new(
            HistogramOpts::new(
                "lichen_invocation_duration_seconds",
                "Time from the request to the response head (queueing included), per function.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            function,
        )?;
        let instantiate_duration = HistogramVec::new(
            HistogramOpts::new(
                "lichen_instantiate_duration_seconds",
                "Time to create a fresh instance, per function.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            function,
        )?;
        let inflight = IntGaugeVec::new(
            Opts::new("lichen_inflight", "Invocations running now, per function."),
            function,
        )?;
        let queued = IntGaugeVec::new(
            Opts::new(
                "lichen_queued",
                "Invocations waiting for a slot, per function.",
            ),
            function,
        )?;
        let memory_peak = IntGaugeVec::new(
            Opts::new(
                "lichen_memory_peak_bytes",
                "Largest linear memory an instance of the function has reached.",
            ),
            function,
        )?;
        let outbound_denied = IntCounterVec::new(
            Opts::new(
                "lichen_outbound_denied_total",
                "Outbound HTTP requests denied by the function's policy.",
            ),
            function,
        )?;
        let responses_cut = IntCounterVec::new(
            Opts::new(
                "lichen_responses_cut_total",
                "Responses cut off at the function's response body limit.",
            ),
            function,
        )?;
        let instances = IntCounterVec::new(
            Opts::new(
                "lichen_instances_total",
                "Instances of functions whose policy reuses them, by event (created, reused, retired).",
            ),
            &["function", "event"],
        )?;
        let handoffs = IntCounterVec::new(
            Opts::new(
                "lichen_guest_handoffs_total",
                "Invocations whose guest ran on another task than its request's, by reason: body (it was still writing its body after the head), joined (it joined a busy WASIp3 instance).",
            ),
            &["function", "reason"],
        )?;
        let unknown_function = IntCounter::with_opts(Opts::new(
            "lichen_unknown_function_requests_total",
            "Invocations of functions that are not deployed.",
        ))?;
        let compile_duration = Histogram::with_opts(
            HistogramOpts::new(
                "lichen_compile_duration_seconds",
                "Time to compile an uploaded component to machine code.",
            )
            .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
        )?;
        let cache_loads = IntCounter::with_opts(Opts::new(
            "lichen_code_cache_loads_total",
            "Functions loaded from the compiled-code cache without compiling.",
        ))?;
        let deploys = IntCounterVec::new(
            Opts::new(
                "lichen_deploys_total",
                "Uploads by outcome (ok, rejected, failed).",
            ),
            &["outcome"],
        )?;
        let functions = IntGauge::with_opts(Opts::new(
            "lichen_functions",
            "Functions deployed and loaded.",
        ))?;
        let policy_reload_errors = IntCounter::with_opts(Opts::new(
            "lichen_policy_reload_errors_total",
            "Policy files that failed to parse or validate.",
        ))?;
        let tls_reloads = IntCounterVec::new(
            Opts::new(
                "lichen_tls_reloads_total",
                "Reloads of the TLS certificate and key by outcome (ok; error: the previous pair stays).",
            ),
            &["outcome"],
        )?;
        let build_info = IntGauge::with_opts(
            Opts::new("lichen_build_info", "Always 1; the labels say which build.")
                .const_label("version", env!("CARGO_PKG_VERSION")),
        )?;
        build_info.set(1);
        let peers_alive = IntGauge::with_opts(Opts::new(
            "lichen_peers_alive",
            "Peer hosts alive in the cluster, this host not counted.",
        ))?;
        let forwarded = IntCounterVec::new(
            Opts::new(
                "lichen_forwarded_total",
                "Invocations forwarded to a peer because this host was full.",
            ),
            &["function", "peer"],
        )?;
        let forward_failures = IntCounter::with_opts(Opts::new(
            "lichen_forward_failures_total",
            "Forwards that failed: no connection, a peer error, or the deadline.",
        ))?;
        let module_fetches = IntCounterVec::new(
            Opts::new(
                "lichen_module_fetches_total",
                "Modules fetched from peers by outcome (ok, hash_mismatch, failed, unavailable).",
            ),
            &["outcome"],
        )?;
        let registry_rejected = IntCounter::with_opts(Opts::new(
            "lichen_registry_rejected_total",
            "Entries of the cluster's registry on NATS refused: not sealed under the cluster secret.",
        ))?;
        let registry_conflicts = IntCounter::with_opts(Opts::new(
            "lichen_registry_conflicts_total",
            "Changes to one function made on two hosts without seeing each other (both versions are kept; one is active).",
        ))?;
        let registry_apply_failures = IntCounterVec::new(
            Opts::new(
                "lichen_registry_apply_failures_total",
                "Registry entries that failed to apply on this host (module unavailable, compile error, disk full), by function.",
            ),
            &["function"],
        )?;
        let peer_clock_offset = GaugeVec::new(
            Opts::new(
                "lichen_peer_clock_offset_seconds",
                "Each live peer's wall clock minus this host's, as gossip last measured it.",
            ),
            &["peer"],
        )?;
        let gossip_rejected = IntCounterVec::new(
            Opts::new(
                "lichen_gossip_rejected_total",
                "Gossip datagrams dropped unread, by reason (malformed, unknown_key, forged, replayed, stale, undecodable).",
            ),
            &["reason"],
        )?;
        let reasons = [
            Rejected::Malformed,
            Rejected::UnknownKey,
            Rejected::Forged,
            Rejected::Replayed,
            Rejected::Stale,
        ];
        for reason in reasons
            .map(Rejected::reason)
            .into_iter()
            .chain([UNDECODABLE])
        {
            gossip_rejected.with_label_values(&[reason]);
        }
        let clock_ahead_refused = IntCounterVec::new(
            Opts::new(
                "lichen_clock_ahead_refused_total",
                "Registry entries, secrets and tokens from peers or NATS refused for a stamp more than --max-clock-ahead ahead of this host's clock, by source.",
            ),
            &["source"],
        )?;
        for source in ["registry", "secret", "token"] {
            clock_ahead_refused.with_label_values(&[source]);
        }
        let gossip_custody = IntGaugeVec::new(
            Opts::new(
                "lichen_gossip_custody",
                "Secrets and tokens this host gossips for the cluster (those it changed, or holds for an origin that is gone), by kind.",
            ),
            &["kind"],
        )?;
        for kind in ["secret", "token"] {
            gossip_custody.with_label_values(&[kind]);
        }
        let peer_requests_refused = IntCounterVec::new(
            Opts::new(
                "lichen_peer_requests_refused_total",
                "Internal requests (module fetches, forwarded invocations) refused, by code.",
            ),
            &["code"],
        )?;
        for refused in [
            Refused::Missing,
            Refused::Invalid,
            Refused::Expired,
            Refused::Replayed,
            Refused::BodyMismatch,
            Refused::BodyUnsigned,
            Refused::CertificateMissing,
        ] {
            peer_requests_refused.with_label_values(&[refused.code()]);
        }

        registry.register(Box::new(invocations.clone()))?;
        registry.register(Box::new(invocation_duration.clone()))?;
        registry.register(Box::new(instantiate_duration.clone()))?;
        registry.register(Box::new(inflight.clone()))?;
        registry.register(Box::new(queued.clone()))?;
        registry.register(Box::new(memory_peak.clone()))?;
        registry.register(Box::new(outbound_denied.clone()))?;
        registry.register(Box::new(responses_cut.clone()))?;
        registry.register(Box::new(instances.clone()))?;
        registry.register(Box::new(handoffs.clone()))?;
        registry.register(Box::new(unknown_function.clone()))?;
        registry.register(Box::new(compile_duration.clone()))?;
        registry.register(Box::new(cache_loads.clone()))?;
        registry.register(Box::new(deploys.clone()))?;
        registry.register(Box::new(functions.clone()))?;
        registry.register(Box::new(policy_reload_errors.clone()))?;
        registry.register(Box::new(tls_reloads.clone()))?;
        registry.register(Box::new(build_info))?;
        registry.register(Box::new(peers_alive.clone()))?;
        registry.register(Box::new(forwarded.clone()))?;
        registry.register(Box::new(forward_failures.clone()))?;
        registry.register(Box::new(module_fetches.clone()))?;
        registry.register(Box::new(registry_conflicts.clone()))?;
        registry.register(Box::new(registry_rejected.clone()))?;
        registry.register(Box::new(registry_apply_failures.clone()))?;
        registry.register(Box::new(peer_clock_offset.clone()))?;
        registry.register(Box::new(gossip_rejected.clone()))?;
        registry.register(Box::new(peer_requests_refused.clone()))?;
        registry.register(Box::new(clock_ahead_refused.clone()))?;
        registry.register(Box::new(gossip_custody.clone()))?;
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        let kv = KvMetrics::register(&registry)?;
        let outbound = OutboundMetrics::register(&registry)?;
        let triggers = crate::triggers::TriggerMetrics::register(&registry)?;
        Ok(Metrics {
            kv,
            outbound,
            triggers,
            registry,
            invocations,
            invocation_duration,
            instantiate_duration,
            inflight,
            queued,
            memory_peak,
            outbound_denied,
            responses_cut,
            instances,
            handoffs,
            unknown_function,
            compile_duration,
            cache_loads,
            deploys,
            functions,
            policy_reload_errors,
            tls_reloads,
            peers_alive,
            forwarded,
            forward_failures,
            module_fetches,
            registry_conflicts,
            registry_rejected,
            registry_apply_failures,
            peer_clock_offset,
            gossip_rejected,
            peer_requests_refused,
            clock_ahead_refused,
            gossip_custody,
        })
    }

    /// Records one finished invocation of a deployed function, looking its
    /// series up (the invocation path holds them in `Serving` instead).
    pub fn record_invocation(
        &self,
        function: &str,
        outcome: Outcome,
        duration: Duration,
        instantiate: Option<Duration>,
        memory_peak: usize,
    ) {
        self.function(function)
            .record_invocation(outcome, duration, instantiate, memory_peak);
    }

    /// `function`'s series, to record into without a lookup per request.
    pub fn function(&self, function: &str) -> FunctionMetrics {
        FunctionMetrics {
            metrics: self.clone(),
            name: Arc::from(function),
            invocations: Default::default(),
            duration: OnceLock::new(),
            instantiate: OnceLock::new(),
            memory_peak: OnceLock::new(),
            responses_cut: OnceLock::new(),
            outbound_denied: OnceLock::new(),
            handoffs: Default::default(),
            instances: Default::default(),
        }
    }

    /// Drops every series of a deleted function.
    pub fn forget_function(&self, function: &str) {
        for outcome in OUTCOMES {
            let _ = self
                .invocations
                .remove_label_values(&[function, outcome.as_str()]);
        }
        let _ = self.invocation_duration.remove_label_values(&[function]);
        let _ = self.instantiate_duration.remove_label_values(&[function]);
        let _ = self.inflight.remove_label_values(&[function]);
        let _ = self.queued.remove_label_values(&[function]);
        let _ = self.memory_peak.remove_label_values(&[function]);
        let _ = self.outbound_denied.remove_label_values(&[function]);
        let _ = self.responses_cut.remove_label_values(&[function]);
        for reason in [Handoff::Body, Handoff::Joined] {
            let _ = self
                .handoffs
                .remove_label_values(&[function, reason.as_str()]);
        }
        for event in INSTANCE_EVENTS {
            let _ = self.instances.remove_label_values(&[function, event]);
        }
        let _ = self
            .registry_apply_failures
            .remove_label_values(&[function]);
        self.kv.forget_function(function);
    }

    /// Invocations of `function` by outcome, read without creating series.
    pub fn invocations_of(&self, function: &str) -> Vec<(String, u64)> {
        series(&self.invocations)
            .into_iter()
            .filter(|s| s.label("function") == Some(function))
            .filter_map(|s| Some((s.label("outcome")?.to_string(), s.value as u64)))
            .collect()
    }

    /// The memory high-water mark of `function` (0 before any call), read
    /// without creating its series.
    pub fn memory_peak_of(&self, function: &str) -> u64 {
        series(&self.memory_peak)
            .into_iter()
            .find(|s| s.label("function") == Some(function))
            .map_or(0, |s| s.value as u64)
    }

    /// Invocations forwarded to each peer, summed over functions.
    pub fn forwarded_by_peer(&self) -> std::collections::HashMap<String, u64> {
        let mut totals = std::collections::HashMap::new();
        for s in series(&self.forwarded) {
            if let Some(peer) = s.label("peer") {
                *totals.entry(peer.to_string()).or_default() += s.value as u64;
            }
        }
        totals
    }

    /// The process's CPU seconds and resident memory, as the process
    /// collector reads them.
    pub fn process(&self) -> (f64, u64) {
        let (mut cpu, mut rss) = (0.0, 0);
        for family in self.registry.gather() {
            let value = |family: &prometheus::proto::MetricFamily| {
                family.get_metric().first().map(|m| {
                    if family.get_field_type() == prometheus::proto::MetricType::COUNTER {
                        m.get_counter().get_value()
                    } else {
                        m.get_gauge().get_value()
                    }
                })
            };
            match family.name() {
                "process_cpu_seconds_total" => cpu = value(&family).unwrap_or(0.0),
                "process_resident_memory_bytes" => rss = value(&family).unwrap_or(0.0) as u64,
                _ => {}
            }
        }
        (cpu, rss)
    }

    /// The exposition text (format 0.0.4).
    pub fn render(&self) -> Result<(String, Vec<u8>)> {
        let encoder = TextEncoder::new();
        let mut out = Vec::new();
        encoder.encode(&self.registry.gather(), &mut out)?;
        Ok((encoder.format_type().to_string(), out))
    }
}

/// One series of a counter or gauge vector: its labels and value.
struct Series {
    labels: Vec<(String, String)>,
    value: f64,
}

impl Series {
    fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The series a vector holds now (collecting creates none).
fn series(vector: &dyn prometheus::core::Collector) -> Vec<Series> {
    let mut all = Vec::new();
    for family in vector.collect() {
        let counter = family.get_field_type() == prometheus::proto::MetricType::COUNTER;
        for metric in family.get_metric() {
            all.push(Series {
                labels: metric
                    .get_label()
                    .iter()
                    .map(|l| (l.name().to_string(), l.value().to_string()))
                    .collect(),
                value: if counter {
                    metric.get_counter().get_value()
                } else {
                    metric.get_gauge().get_value()
                },
            });
        }
    }
    all
}
