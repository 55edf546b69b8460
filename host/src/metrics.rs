//! Prometheus metrics, from a registry the host owns (not the crate's global
//! one, so several hosts in one process, as in tests, never mix their figures).

use anyhow::Result;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    /// Compilations from WebAssembly to machine code, with their durations.
    pub compile_duration: Histogram,
    /// Functions whose compiled code came from the cache instead.
    pub cache_loads: IntCounter,
    pub deploys: IntCounterVec,
    /// Policy files that failed to load (the last good one stayed).
    pub policy_reload_errors: IntCounter,
    /// Outbound requests a policy denied, per function.
    pub outbound_denied: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Result<Self> {
        let registry = Registry::new();
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
            Opts::new("lichen_deploys_total", "Uploads by outcome."),
            &["outcome"],
        )?;
        let policy_reload_errors = IntCounter::with_opts(Opts::new(
            "lichen_policy_reload_errors_total",
            "Policy files that failed to parse or validate.",
        ))?;
        registry.register(Box::new(policy_reload_errors.clone()))?;
        let outbound_denied = IntCounterVec::new(
            Opts::new(
                "lichen_outbound_denied_total",
                "Outbound HTTP requests denied by the function's policy.",
            ),
            &["function"],
        )?;
        registry.register(Box::new(outbound_denied.clone()))?;
        registry.register(Box::new(compile_duration.clone()))?;
        registry.register(Box::new(cache_loads.clone()))?;
        registry.register(Box::new(deploys.clone()))?;
        Ok(Metrics {
            registry,
            compile_duration,
            cache_loads,
            deploys,
            policy_reload_errors,
            outbound_denied,
        })
    }

    /// The exposition text (format 0.0.4).
    pub fn render(&self) -> Result<(String, Vec<u8>)> {
        let encoder = TextEncoder::new();
        let mut out = Vec::new();
        encoder.encode(&self.registry.gather(), &mut out)?;
        Ok((encoder.format_type().to_string(), out))
    }
}
