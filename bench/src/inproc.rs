//! In-process measurements through the host library, no HTTP: a fresh
//! instance plus a call of hello (the per-request cost of the sandbox), and
//! the fib function in wasm against the same Rust code compiled natively.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Result;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use lichen::engine::{Deployed, EngineSettings, Runtime};
use lichen::names::FunctionName;
use lichen::policy::Policy;
use lichen::sandbox::{Invocation, InvocationStats};
use lichen::store::{VersionInfo, sha256_hex};

use crate::{fib, hash};

pub struct Prepared {
    runtime: Runtime,
    deployed: Deployed,
    invocation: Invocation,
}

/// Compiles and pre-instantiates `component` as the host would.
pub fn prepare(name: &str, component: &[u8]) -> Result<Prepared> {
    let runtime = Runtime::new(EngineSettings::default())?;
    let compiled = runtime.compile(component)?;
    let version = VersionInfo {
        version: 1,
        sha256: sha256_hex(component),
        size: component.len() as u64,
        created_unix: 0,
        abi: Default::default(),
        oci: None,
    };
    let deployed = runtime.prepare(FunctionName::new(name)?, version, &compiled)?;
    let invocation = Invocation {
        function: Arc::from(name),
        request_id: Arc::from("bench"),
        policy: Arc::new(Policy::default()),
        on_denied: Arc::new(|| {}),
        stats: Arc::new(InvocationStats::default()),
        on_instance: Arc::new(|_| {}),
        on_memory_peak: Arc::new(|_| {}),
        kv: None,
        outbound: None,
        recent: None,
        secrets: None,
        trace: None,
    };
    Ok(Prepared {
        runtime,
        deployed,
        invocation,
    })
}

/// Per-call figures of the instantiate + call loop.
pub struct CallTimes {
    /// From the start of the invocation to the last byte of the body.
    pub total: Vec<Duration>,
    /// The part of `total` spent instantiating (as the host records it).
    pub instantiate: Vec<Duration>,
}

impl Prepared {
    /// One invocation of `uri`, its body read in full; returns the body.
    pub async fn call(&self, uri: &str) -> Result<Bytes> {
        let body = Full::new(Bytes::new())
            .map_err(|never| -> wasmtime_wasi_http::Error { match never {} });
        let request = hyper::Request::get(uri)
            .header("host", "bench")
            .body(body)?;
        let (result, _outcome) = self
            .runtime
            .invoke(&self.deployed, request, &self.invocation)
            .await;
        let response = result.map_err(|e| anyhow::anyhow!("{}: {}", e.code, e.message))?;
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("{e:?}"))?
            .to_bytes();
        Ok(bytes)
    }
}

/// Per-call times of `iterations` instantiate + call of hello, after warming
/// up. The loop runs as a task on the runtime's workers, as a connection task
/// of the server does, not from outside the runtime (which would add a
/// cross-thread wake-up to every call that the server does not pay).
pub async fn instantiate_and_call(hello: &[u8], iterations: usize) -> Result<CallTimes> {
    let prepared = prepare("hello", hello)?;
    tokio::spawn(async move { call_loop(prepared, iterations).await }).await?
}

async fn call_loop(prepared: Prepared, iterations: usize) -> Result<CallTimes> {
    for _ in 0..iterations / 10 + 10 {
        prepared.call("/").await?;
    }
    let mut times = CallTimes {
        total: Vec::with_capacity(iterations),
        instantiate: Vec::with_capacity(iterations),
    };
    let recorded = &prepared.invocation.stats.instantiate_ns;
    for _ in 0..iterations {
        let started = Instant::now();
        let body = prepared.call("/").await?;
        times.total.push(started.elapsed());
        black_box(body);
        let nanos = recorded.load(Ordering::Relaxed);
        times.instantiate.push(Duration::from_nanos(nanos));
    }
    Ok(times)
}

/// A CPU-bound workload: the same source file compiled into a guest and
/// natively into the benchmark.
pub struct Workload {
    /// What the report calls it, e.g. `fib(32)`.
    pub label: String,
    /// What bounds it, for the reader: calls or loops.
    pub kind: &'static str,
    /// The component in functions/ and the request that runs it there.
    pub function: &'static str,
    uri: String,
    /// The computation natively, answering exactly what the guest answers.
    native: Box<dyn Fn() -> String + Send>,
}

impl Workload {
    /// The naive recursive Fibonacci: a call per step, so call overhead
    /// (and wasmtime's epoch check at each function entry) dominates.
    pub fn fib(n: u32) -> Self {
        Workload {
            label: format!("fib({n})"),
            kind: "call-bound",
            function: "fib",
            uri: format!("/?n={n}"),
            native: Box::new(move || {
                let fib = fib::fib(black_box(n));
                serde_json::json!({ "n": n, "fib": fib }).to_string()
            }),
        }
    }

    /// SHA-256 over `mib` MiB: tight loops of integer arithmetic.
    pub fn sha256(mib: u32) -> Self {
        Workload {
            label: format!("SHA-256 of {mib} MiB"),
            kind: "loop-bound",
            function: "hash",
            uri: format!("/?mib={mib}"),
            native: Box::new(move || {
                let digest = hash::hash_chain(black_box(mib));
                let hex: String = digest.iter().map(|byte| format!("{byte:02x}")).collect();
                hex + "\n"
            }),
        }
    }
}

/// `workload` in wasm through the host (a fresh instance included) and
/// natively, alternating, `rounds` each; the answers must agree.
pub async fn compute(
    component: &[u8],
    workload: &Workload,
    rounds: usize,
) -> Result<(Vec<Duration>, Vec<Duration>)> {
    let prepared = prepare(workload.function, component)?;
    let mut wasm = Vec::new();
    let mut native = Vec::new();
    for _ in 0..rounds {
        let started = Instant::now();
        let body = prepared.call(&workload.uri).await?;
        wasm.push(started.elapsed());

        let started = Instant::now();
        let expected = (workload.native)();
        native.push(started.elapsed());
        anyhow::ensure!(
            body == expected.as_bytes(),
            "{}: wasm answered {:?}, native {expected:?}",
            workload.label,
            String::from_utf8_lossy(&body)
        );
    }
    Ok((wasm, native))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guest built by `functions/build.sh` (the test script builds them
    /// before the tests run).
    fn component(name: &str) -> Vec<u8> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../functions/target/wasm32-wasip2/release")
            .join(format!("{name}.wasm"));
        std::fs::read(&path)
            .unwrap_or_else(|e| panic!("{}: {e}; run functions/build.sh", path.display()))
    }

    /// The in-process scenarios in a few calls, so the harness keeps working
    /// between full runs; the figures themselves are not asserted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_in_process_scenarios_run_and_check_their_answers() {
        let times = instantiate_and_call(&component("hello"), 20).await.unwrap();
        assert_eq!(times.total.len(), 20);
        for (instantiate, total) in times.instantiate.iter().zip(&times.total) {
            assert!(!instantiate.is_zero() && instantiate <= total);
        }

        for workload in [Workload::fib(20), Workload::sha256(1)] {
            let (wasm, native) = compute(&component(workload.function), &workload, 2)
                .await
                .unwrap();
            assert_eq!((wasm.len(), native.len()), (2, 2));
        }

        let wrong = Workload {
            native: Box::new(|| "not what the guest says".to_string()),
            ..Workload::sha256(1)
        };
        let error = compute(&component("hash"), &wrong, 1).await.unwrap_err();
        assert!(error.to_string().contains("wasm answered"), "{error}");
    }
}
