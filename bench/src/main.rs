//! `lichen-bench`: Lichen side by side with `wasmtime serve` and a native
//! hyper server on the same machine in the same run, plus in-process, compute,
//! cold-path and scale measurements. Prints a table and writes
//! `bench/RESULTS.md`. Run it through `bench/run.sh`, which builds and
//! installs what it needs.
//!
//! ```text
//! lichen-bench all [--smoke] [--out FILE]   every scenario (smoke: ~1 s each)
//! lichen-bench native-hello ADDR            the native baseline server
//! lichen-bench instantiate [N]              only the in-process loop (for profilers)
//! lichen-bench history                      only the status page history's costs
//! lichen-bench seal                         only sealed gossip and signed peer requests
//! lichen-bench compute [ROUNDS]             only fib and SHA-256, wasm vs native
//! lichen-bench scale [N]                    only the many-functions scenario
//! lichen-bench map [--smoke]                only the map, one host vs three
//! lichen-bench p3 [--smoke]                 only WASIp3 hello: reuse and fresh
//! lichen-bench kv [--smoke]                 only key-value: local vs NATS
//! lichen-bench outbound [--smoke]           only outbound HTTP: pooled vs a connection per request
//! lichen-bench tracing [--smoke]            only hello traced and exported vs not traced
//! lichen-bench queue [--smoke]              only NATS messages through a trigger vs a native consumer
//! ```
//!
//! Inputs from the environment: `LICHEN_BIN` (default `target/release/lichen`),
//! `WASMTIME_BIN` (the official CLI; its scenarios are skipped without it),
//! `FUNCTIONS_DIR` (default `functions/target/wasm32-wasip2/release`),
//! `NATS_SERVER_BIN` (a `nats-server`; the NATS rows are skipped without it).

/// The fib and hash functions' computations, the same source files the
/// guests compile to wasm, compiled natively for the compute comparison.
#[path = "../../functions/fib/src/compute.rs"]
mod fib;
#[path = "../../functions/hash/src/compute.rs"]
mod hash;
mod history;
mod inproc;
mod load;
mod queue;
mod report;
mod seal;
mod servers;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use report::{Report, median, percentile};
use servers::{Scratch, Server};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let smoke = args.iter().any(|a| a == "--smoke");
    match args.first().map(String::as_str) {
        Some("native-hello") => {
            let addr = args.get(1).map_or("127.0.0.1:0", String::as_str);
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(servers::run_native_hello(addr))
        }
        Some("instantiate") => {
            // Just the in-process instantiate + call loop: for profiling.
            let settings = Settings::from_env(false)?;
            let iterations: usize = args.get(1).map_or(Ok(50_000), |n| n.parse())?;
            let runtime = if std::env::var_os("BENCH_CURRENT_THREAD").is_some() {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?
            } else {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()?
            };
            let times = runtime.block_on(inproc::instantiate_and_call(
                &settings.component("hello")?,
                iterations,
            ))?;
            println!(
                "instantiate + call x{iterations}: p50 {:?}, p99 {:?} (instantiate alone p50 {:?})",
                percentile(&times.total, 0.5),
                percentile(&times.total, 0.99),
                percentile(&times.instantiate, 0.5)
            );
            Ok(())
        }
        Some("history") => {
            // Just the status page history's costs, beside instantiate + call.
            let settings = Settings::from_env(smoke)?;
            let call = call_p50(&settings)?;
            let history = history::measure(200);
            let mut report = Report::new(&settings)?;
            report.history(&history, call);
            println!("{}", report.markdown());
            Ok(())
        }
        Some("seal") => {
            // Just the cluster plane's sealing and signing, beside instantiate + call.
            let settings = Settings::from_env(smoke)?;
            let call = call_p50(&settings)?;
            let rows = seal::measure(if settings.smoke { 5 } else { 100 })?;
            let mut report = Report::new(&settings)?;
            report.seal(&rows, call);
            println!("{}", report.markdown());
            Ok(())
        }
        Some("compute") => {
            // Just the compute workloads in wasm vs natively, ROUNDS alternating.
            let settings = Settings::from_env(false)?;
            let rounds: usize = args.get(1).map_or(Ok(15), |r| r.parse())?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            for workload in [inproc::Workload::fib(32), inproc::Workload::sha256(32)] {
                let component = settings.component(workload.function)?;
                let (wasm, native) =
                    runtime.block_on(inproc::compute(&component, &workload, rounds))?;
                let (w, nat) = (median(&wasm), median(&native));
                println!(
                    "{} x{rounds}: wasm p50 {w:?}, native p50 {nat:?}, ratio {:.2}x",
                    workload.label,
                    w.as_secs_f64() / nat.as_secs_f64()
                );
            }
            Ok(())
        }
        Some("scale") => {
            // Just the many-functions scenario, with N functions.
            let mut settings = Settings::from_env(false)?;
            settings.functions = args.get(1).map_or(Ok(1000), |n| n.parse())?;
            settings.rounds = 1;
            alone(&settings, scale)
        }
        Some("map") => {
            // Just the map scenario: 1 host vs 3.
            let mut settings = Settings::from_env(smoke)?;
            settings.rounds = settings.rounds.min(2);
            alone(&settings, map)
        }
        Some("p3") => {
            // Just WASIp3 hello against wasmtime serve and native hyper.
            alone(&Settings::from_env(smoke)?, p3_throughput)
        }
        Some("throughput") => {
            // Just WASIp2 hello (fresh instances) against wasmtime serve and
            // native hyper.
            alone(&Settings::from_env(smoke)?, throughput)
        }
        Some("kv") => {
            // Just the key-value scenario: local vs NATS beside hello.
            alone(&Settings::from_env(smoke)?, kv)
        }
        Some("outbound") => alone(&Settings::from_env(smoke)?, outbound),
        Some("tracing") => alone(&Settings::from_env(smoke)?, traced),
        Some("queue") => alone(&Settings::from_env(smoke)?, queue),
        Some("all") => {
            let out = args
                .iter()
                .position(|a| a == "--out")
                .and_then(|i| args.get(i + 1))
                .map_or_else(|| PathBuf::from("bench/RESULTS.md"), PathBuf::from);
            run_all(&Settings::from_env(smoke)?, &out)
        }
        _ => bail!(
            "usage: lichen-bench all [--smoke] [--out FILE] | instantiate N | history | seal | compute [ROUNDS] | scale N | map [--smoke] | throughput [--smoke] | p3 [--smoke] | kv [--smoke] | outbound [--smoke] | tracing [--smoke] | queue [--smoke] | native-hello ADDR"
        ),
    }
}

/// One scenario alone, its report printed.
fn alone(settings: &Settings, scenario: fn(&Settings, &mut Report) -> Result<()>) -> Result<()> {
    let mut report = Report::new(settings)?;
    scenario(settings, &mut report)?;
    println!("{}", report.markdown());
    Ok(())
}

/// hello's instantiate + call p50 in process over 20,000 calls: the
/// baseline the history's and the cluster plane's figures are set against.
fn call_p50(settings: &Settings) -> Result<Duration> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let times = runtime.block_on(inproc::instantiate_and_call(
        &settings.component("hello")?,
        20_000,
    ))?;
    Ok(percentile(&times.total, 0.5))
}

/// How long and how often: the full run, or a smoke run that only checks the
/// harness still works.
pub struct Settings {
    pub smoke: bool,
    pub rounds: usize,
    pub seconds: u32,
    pub connections: u32,
    pub functions: usize,
    pub lichen: PathBuf,
    /// Another build of Lichen to run beside it (`LICHEN_BASELINE_BIN`),
    /// for before and after in one command (`p3` only).
    pub baseline: Option<PathBuf>,
    pub wasmtime: Option<PathBuf>,
    pub nats_server: Option<PathBuf>,
    pub components: PathBuf,
    pub self_exe: PathBuf,
}

impl Settings {
    fn from_env(smoke: bool) -> Result<Self> {
        let lichen = std::env::var_os("LICHEN_BIN")
            .map_or_else(|| PathBuf::from("target/release/lichen"), PathBuf::from);
        let wasmtime = std::env::var_os("WASMTIME_BIN").map(PathBuf::from);
        let baseline = std::env::var_os("LICHEN_BASELINE_BIN").map(PathBuf::from);
        let nats_server = std::env::var_os("NATS_SERVER_BIN").map(PathBuf::from);
        let components = std::env::var_os("FUNCTIONS_DIR").map_or_else(
            || PathBuf::from("functions/target/wasm32-wasip2/release"),
            PathBuf::from,
        );
        Ok(Settings {
            smoke,
            rounds: if smoke { 1 } else { 3 },
            seconds: if smoke { 1 } else { 10 },
            connections: 64,
            functions: if smoke { 20 } else { 1000 },
            lichen,
            baseline,
            wasmtime,
            nats_server,
            components,
            self_exe: std::env::current_exe()?,
        })
    }

    fn component(&self, name: &str) -> Result<Vec<u8>> {
        let path = self.components.join(format!("{name}.wasm"));
        std::fs::read(&path)
            .with_context(|| format!("reading {} (run functions/build.sh)", path.display()))
    }

    fn component_path(&self, name: &str) -> PathBuf {
        self.components.join(format!("{name}.wasm"))
    }
}

/// A host started for the benchmark, with hello deployed under a policy that
/// lets 64 connections through (the defaults would queue and shed them).
fn lichen_with_hello(settings: &Settings, scratch: &Scratch) -> Result<Server> {
    lichen_with_hello_and(settings, scratch, &[])
}

/// [`lichen_with_hello`], the host started with `extra` flags.
fn lichen_with_hello_and(
    settings: &Settings,
    scratch: &Scratch,
    extra: &[String],
) -> Result<Server> {
    std::fs::write(
        scratch.policies().join("hello.toml"),
        "[limits]\nconcurrency = 128\nqueue = 1024\n",
    )?;
    let server = servers::lichen_with(
        &settings.lichen,
        &scratch.data(),
        &scratch.policies(),
        extra,
    )?;
    servers::deploy(&server.url, "hello", &settings.component("hello")?)?;
    Ok(server)
}

fn run_all(settings: &Settings, out: &Path) -> Result<()> {
    let mut report = Report::new(settings)?;
    throughput(settings, &mut report)?;
    p3_throughput(settings, &mut report)?;
    open_loop(settings, &mut report)?;
    in_process(settings, &mut report)?;
    cold_paths(settings, &mut report)?;
    scale(settings, &mut report)?;
    map(settings, &mut report)?;
    kv(settings, &mut report)?;
    outbound(settings, &mut report)?;
    traced(settings, &mut report)?;
    queue(settings, &mut report)?;
    let markdown = report.markdown();
    println!("{markdown}");
    std::fs::write(out, &markdown).with_context(|| format!("writing {}", out.display()))?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

/// Closed loop, wrk -t1 -c64, servers alternating A B C A B C.
fn throughput(settings: &Settings, report: &mut Report) -> Result<()> {
    let hello = settings.component_path("hello");
    let mut runs: Vec<(&'static str, load::WrkResult)> = Vec::new();
    for round in 0..settings.rounds {
        for kind in ["lichen", "wasmtime serve", "native hyper"] {
            let scratch = Scratch::new(&format!("tp-{round}"))?;
            let server = match kind {
                "lichen" => lichen_with_hello(settings, &scratch)?,
                "wasmtime serve" => match &settings.wasmtime {
                    Some(bin) => servers::wasmtime(bin, &hello)?,
                    None => continue,
                },
                _ => servers::native(&settings.self_exe)?,
            };
            let url = match kind {
                "lichen" => format!("{}/fn/hello", server.url),
                _ => format!("{}/", server.url),
            };
            // Warm up: connections, caches, the allocator's pools.
            load::wrk(&url, settings.connections, 1)?;
            let result = load::wrk(&url, settings.connections, settings.seconds)?;
            eprintln!(
                "throughput round {round} {kind}: {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, errors {}",
                result.requests_per_sec, result.p50_ms, result.p99_ms, result.errors
            );
            runs.push((kind, result));
            server.stop();
        }
    }
    report.throughput(&runs);
    Ok(())
}

/// `wasmtime serve`'s defaults for WASIp3 components, which Lichen's reuse
/// policy is set to match: 128 requests per instance, 16 at once.
const P3_REUSE: &str = "[limits]\nconcurrency = 128\nqueue = 1024\n[instances]\nreuse = 128\nconcurrency = 16\nidle = \"1s\"\n";
const P3_FRESH: &str = "[limits]\nconcurrency = 128\nqueue = 1024\n";

/// The baseline build's run of `lichen p3 reuse`.
pub const BASELINE_P3_REUSE: &str = "lichen (baseline) p3 reuse";

/// WASIp3 hello (the same component everywhere), closed loop, alternating:
/// Lichen reusing instances as `wasmtime serve` does by default, both with
/// a fresh instance per request, and native hyper.
fn p3_throughput(settings: &Settings, report: &mut Report) -> Result<()> {
    let hello = settings.component_path("hello_p3");
    let mut kinds = vec![
        "lichen p3 reuse",
        "wasmtime serve p3 reuse",
        "lichen p3 fresh",
        "wasmtime serve p3 fresh",
        "native hyper",
    ];
    if settings.baseline.is_some() {
        kinds.insert(1, BASELINE_P3_REUSE);
    }
    let mut runs: Vec<(&'static str, load::WrkResult)> = Vec::new();
    for round in 0..settings.rounds {
        for &kind in &kinds {
            let scratch = Scratch::new(&format!("p3-{round}"))?;
            let lichen = |policy: &str| -> Result<Server> {
                std::fs::write(scratch.policies().join("hello.toml"), policy)?;
                let bin = match (&settings.baseline, kind) {
                    (Some(baseline), BASELINE_P3_REUSE) => baseline,
                    _ => &settings.lichen,
                };
                let server = servers::lichen(bin, &scratch.data(), &scratch.policies())?;
                servers::deploy(&server.url, "hello", &settings.component("hello_p3")?)?;
                Ok(server)
            };
            let server = match kind {
                "lichen p3 reuse" | BASELINE_P3_REUSE => lichen(P3_REUSE)?,
                "lichen p3 fresh" => lichen(P3_FRESH)?,
                "native hyper" => servers::native(&settings.self_exe)?,
                _ => {
                    let Some(bin) = &settings.wasmtime else {
                        continue;
                    };
                    let flags: &[&str] = if kind.ends_with("fresh") {
                        &["--max-instance-reuse-count", "1"]
                    } else {
                        &[]
                    };
                    servers::wasmtime_with(bin, &hello, flags)?
                }
            };
            let url = if kind.starts_with("lichen") {
                format!("{}/fn/hello", server.url)
            } else {
                format!("{}/", server.url)
            };
            load::wrk(&url, settings.connections, 1)?;
            let result = load::wrk(&url, settings.connections, settings.seconds)?;
            eprintln!(
                "p3 round {round} {kind}: {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, errors {}",
                result.requests_per_sec, result.p50_ms, result.p99_ms, result.errors
            );
            runs.push((kind, result));
            server.stop();
        }
    }
    report.p3_throughput(&runs);
    Ok(())
}

/// The key-value functions' policy: room for the load, the store granted.
const KV_POLICY: &str = "[limits]\nconcurrency = 128\nqueue = 1024\n[keyvalue]\nstores = [\"default\"]\nmax_keys = 100000\n";

/// Key-value operations through HTTP, closed loop, each backend in turn per
/// round: counter increments (`counter`, 100 paths), and 1 KiB sets and
/// gets (`kv-draft`, 1,000 keys), with hello on the same host as the
/// baseline. Local: redb in the data directory; NATS: a single
/// `nats-server` with JetStream on loopback (file storage, one replica).
fn kv(settings: &Settings, report: &mut Report) -> Result<()> {
    let scripts = Scratch::new("kv-scripts")?;
    let script = |name: &str, body: &str| -> Result<PathBuf> {
        let path = scripts.0.join(name);
        std::fs::write(&path, body)?;
        Ok(path)
    };
    let counter = script(
        "counter.lua",
        "request = function()\n  return wrk.format(\"GET\", \"/fn/counter/page\" .. math.random(100))\nend\n",
    )?;
    let set = script(
        "set.lua",
        "local body = string.rep(\"x\", 1024)\nrequest = function()\n  return wrk.format(\"POST\", \"/fn/kv?op=set&key=k\" .. math.random(1000), nil, body)\nend\n",
    )?;
    let get = script(
        "get.lua",
        "request = function()\n  return wrk.format(\"GET\", \"/fn/kv?op=get&key=k\" .. math.random(1000))\nend\n",
    )?;
    let backends: Vec<&str> = match &settings.nats_server {
        Some(_) => vec!["local", "nats"],
        None => vec!["local"],
    };
    let mut runs: Vec<(String, load::WrkResult)> = Vec::new();
    for round in 0..settings.rounds {
        for backend in &backends {
            let scratch = Scratch::new(&format!("kv-{round}-{backend}"))?;
            let nats = match (*backend, &settings.nats_server) {
                ("nats", Some(bin)) => Some(servers::nats(bin, &scratch.0.join("nats"))?),
                _ => None,
            };
            let extra: Vec<String> = match &nats {
                Some(nats) => servers::on_nats(&nats.url),
                None => Vec::new(),
            };
            for name in ["hello", "counter", "kv"] {
                let policy = if name == "hello" {
                    "[limits]\nconcurrency = 128\nqueue = 1024\n"
                } else {
                    KV_POLICY
                };
                std::fs::write(scratch.policies().join(format!("{name}.toml")), policy)?;
            }
            let server = servers::lichen_with(
                &settings.lichen,
                &scratch.data(),
                &scratch.policies(),
                &extra,
            )?;
            servers::deploy(&server.url, "hello", &settings.component("hello")?)?;
            servers::deploy(&server.url, "counter", &settings.component("counter")?)?;
            servers::deploy(&server.url, "kv", &settings.component("kv_draft")?)?;
            let workloads: [(&str, String, Option<&Path>); 4] = [
                ("hello", format!("{}/fn/hello", server.url), None),
                ("counter increment", server.url.clone(), Some(&counter)),
                ("set 1 KiB", server.url.clone(), Some(&set)),
                ("get 1 KiB", server.url.clone(), Some(&get)),
            ];
            for (workload, url, script) in workloads {
                load::wrk_script(&url, settings.connections, 1, script)?;
                let result =
                    load::wrk_script(&url, settings.connections, settings.seconds, script)?;
                eprintln!(
                    "kv round {round} {backend} {workload}: {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, errors {}",
                    result.requests_per_sec, result.p50_ms, result.p99_ms, result.errors
                );
                runs.push((format!("{workload} ({backend})"), result));
            }
            server.stop();
            if let Some(nats) = nats {
                nats.stop();
            }
        }
    }
    report.kv(&runs);
    Ok(())
}

/// A function calling a native upstream on loopback for every request:
/// Lichen's pooled outbound connections against the same host making a new
/// connection per request (`--outbound-no-keep-alive`, what every request
/// did before the pool), alternating; TIME_WAIT sockets counted after each.
fn outbound(settings: &Settings, report: &mut Report) -> Result<()> {
    let mut runs: Vec<(&'static str, load::WrkResult, usize)> = Vec::new();
    for round in 0..settings.rounds {
        for kind in ["pooled", "connection per request"] {
            let upstream = servers::native(&settings.self_exe)?;
            let scratch = Scratch::new(&format!("outbound-{round}"))?;
            std::fs::write(
                scratch.policies().join("probe.toml"),
                "[limits]\nconcurrency = 128\nqueue = 1024\n[outbound]\nallow = [\"http://127.0.0.1:*\"]\nmax_connections = 64\n",
            )?;
            let extra: Vec<String> = if kind == "pooled" {
                Vec::new()
            } else {
                vec!["--outbound-no-keep-alive".into()]
            };
            let server = servers::lichen_with(
                &settings.lichen,
                &scratch.data(),
                &scratch.policies(),
                &extra,
            )?;
            servers::deploy(&server.url, "probe", &settings.component("probe")?)?;
            let url = format!("{}/fn/probe/fetch?url={}/", server.url, upstream.url);
            load::wrk(&url, settings.connections, 1)?;
            // Let the warm-up's closed sockets age out of the count less
            // than a run's do: count what the run itself leaves.
            let before = load::time_wait_sockets();
            let result = load::wrk(&url, settings.connections, settings.seconds)?;
            let after = load::time_wait_sockets();
            let time_wait = after.saturating_sub(before);
            eprintln!(
                "outbound round {round} {kind}: {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, errors {}, TIME_WAIT +{time_wait}",
                result.requests_per_sec, result.p50_ms, result.p99_ms, result.errors
            );
            runs.push((kind, result, time_wait));
            server.stop();
            upstream.stop();
        }
    }
    report.outbound(&runs);
    Ok(())
}

/// hello with every invocation traced (sampling 1.0, exported over OTLP/HTTP
/// to a native hyper server on loopback that takes each export) against the
/// same host with tracing off, alternating.
fn traced(settings: &Settings, report: &mut Report) -> Result<()> {
    let mut runs: Vec<(&'static str, load::WrkResult)> = Vec::new();
    for round in 0..settings.rounds {
        for kind in ["off", "traced"] {
            let collector = servers::native(&settings.self_exe)?;
            let scratch = Scratch::new(&format!("trace-{round}"))?;
            let extra: Vec<String> = match kind {
                "traced" => vec![
                    "--otlp-endpoint".into(),
                    collector.url.clone(),
                    "--trace-sampling".into(),
                    "1.0".into(),
                ],
                _ => Vec::new(),
            };
            let server = lichen_with_hello_and(settings, &scratch, &extra)?;
            let url = format!("{}/fn/hello", server.url);
            load::wrk(&url, settings.connections, 1)?;
            let result = load::wrk(&url, settings.connections, settings.seconds)?;
            eprintln!(
                "tracing round {round} {kind}: {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, errors {}",
                result.requests_per_sec, result.p50_ms, result.p99_ms, result.errors
            );
            runs.push((kind, result));
            server.stop();
            collector.stop();
        }
    }
    report.tracing(&runs);
    Ok(())
}

/// Messages per second through `hello` with a NATS trigger, one host,
/// against a native pull consumer of the same messages; alternating.
fn queue(settings: &Settings, report: &mut Report) -> Result<()> {
    let Some(nats_bin) = &settings.nats_server else {
        eprintln!("queue: no NATS_SERVER_BIN, skipped");
        return Ok(());
    };
    let messages: u64 = if settings.rounds == 1 { 2_000 } else { 20_000 };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut runs: Vec<(&'static str, f64)> = Vec::new();
    for round in 0..settings.rounds {
        for kind in ["native", "lichen"] {
            let scratch = Scratch::new(&format!("queue-{round}-{kind}"))?;
            let nats = servers::nats(nats_bin, &scratch.0.join("nats"))?;
            let js = runtime.block_on(queue::stream(&nats.url))?;
            let host = match kind {
                "lichen" => {
                    std::fs::write(
                        scratch.policies().join("hello.toml"),
                        "[limits]\nconcurrency = 128\nqueue = 1024\n\n[[triggers.nats]]\nstream = \"BENCH\"\nmax_inflight = 64\n",
                    )?;
                    let extra = servers::on_nats(&nats.url);
                    let server = servers::lichen_with(
                        &settings.lichen,
                        &scratch.data(),
                        &scratch.policies(),
                        &extra,
                    )?;
                    servers::deploy(&server.url, "hello", &settings.component("hello")?)?;
                    Some(server)
                }
                _ => None,
            };
            let elapsed = runtime.block_on(async {
                let consumer = match &host {
                    Some(_) => queue::wait_for_consumer(&js, "lichen-hello-0").await?,
                    None => queue::native_consumer(&js, 64).await?,
                };
                queue::publish_and_drain(&js, consumer, messages).await
            })?;
            let rate = messages as f64 / elapsed.as_secs_f64();
            eprintln!(
                "queue round {round} {kind}: {rate:.0} messages/s ({messages} in {elapsed:.2?})"
            );
            runs.push((kind, rate));
            if let Some(server) = host {
                server.stop();
            }
            nats.stop();
        }
    }
    report.queue(messages, &runs);
    Ok(())
}

/// Open loop at half of wasmtime serve's median throughput.
fn open_loop(settings: &Settings, report: &mut Report) -> Result<()> {
    let baseline = report
        .median_rps("wasmtime serve")
        .or_else(|| report.median_rps("lichen"))
        .context("no throughput figures to pick a rate from")?;
    let rate = (baseline / 2.0).max(100.0);
    let hello = settings.component_path("hello");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut runs = Vec::new();
    for round in 0..settings.rounds {
        for kind in ["lichen", "wasmtime serve"] {
            let scratch = Scratch::new(&format!("ol-{round}"))?;
            let server = match kind {
                "lichen" => lichen_with_hello(settings, &scratch)?,
                _ => match &settings.wasmtime {
                    Some(bin) => servers::wasmtime(bin, &hello)?,
                    None => continue,
                },
            };
            let url = match kind {
                "lichen" => format!("{}/fn/hello", server.url),
                _ => format!("{}/", server.url),
            };
            load::wrk(&url, settings.connections, 1)?;
            let result = runtime.block_on(load::open_loop(
                &url,
                rate,
                f64::from(settings.seconds),
                settings.connections as usize,
            ))?;
            eprintln!(
                "open loop round {round} {kind} at {rate:.0}/s: p50 {:.2} ms, p99 {:.2} ms, failed {}",
                result.p50_ms, result.p99_ms, result.failed
            );
            runs.push((kind, result));
            server.stop();
        }
    }
    report.open_loop(rate, &runs);
    Ok(())
}

/// Instantiate + call and compute, through the library.
fn in_process(settings: &Settings, report: &mut Report) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let iterations = if settings.smoke { 2_000 } else { 20_000 };
    let times = runtime.block_on(inproc::instantiate_and_call(
        &settings.component("hello")?,
        iterations,
    ))?;
    eprintln!(
        "instantiate + call: p50 {:?}, p99 {:?} (instantiate alone p50 {:?})",
        percentile(&times.total, 0.5),
        percentile(&times.total, 0.99),
        percentile(&times.instantiate, 0.5)
    );
    report.instantiate(iterations, &times);

    let history = history::measure(if settings.smoke { 20 } else { 200 });
    eprintln!(
        "status history: recording p50 {:?} (two threads {:?}), summary of a full minute p50 {:?}",
        median(&history.record),
        median(&history.record_two_threads),
        median(&history.summary_full)
    );
    report.history(&history, percentile(&times.total, 0.5));
    report.seal(
        &seal::measure(if settings.smoke { 5 } else { 100 })?,
        percentile(&times.total, 0.5),
    );

    let rounds = if settings.smoke { 3 } else { 7 };
    let workloads = if settings.smoke {
        [inproc::Workload::fib(25), inproc::Workload::sha256(2)]
    } else {
        [inproc::Workload::fib(32), inproc::Workload::sha256(32)]
    };
    let mut results = Vec::new();
    for workload in workloads {
        let component = settings.component(workload.function)?;
        let (wasm, native) = runtime.block_on(inproc::compute(&component, &workload, rounds))?;
        eprintln!(
            "{}: wasm {:?}, native {:?}",
            workload.label,
            median(&wasm),
            median(&native)
        );
        results.push((workload, wasm, native));
    }
    report.compute(&results);
    Ok(())
}

/// Upload to first 200 (compile included), and restart to first 200 (code
/// from the cache).
fn cold_paths(settings: &Settings, report: &mut Report) -> Result<()> {
    let hello = settings.component("hello")?;
    let scratch = Scratch::new("cold")?;
    let server = servers::lichen(&settings.lichen, &scratch.data(), &scratch.policies())?;
    let mut uploads = Vec::new();
    for round in 0..settings.rounds.max(3) {
        let name = format!("cold-{round}");
        let bytes = servers::distinct_component(&hello, &name);
        let started = Instant::now();
        servers::deploy(&server.url, &name, &bytes)?;
        let took = load::wait_for_200(
            &format!("{}/fn/{name}", server.url),
            started,
            Duration::from_secs(60),
        )?;
        uploads.push(took);
    }
    server.stop();
    let mut restarts = Vec::new();
    for _ in 0..settings.rounds.max(3) {
        let started = Instant::now();
        let server = servers::lichen(&settings.lichen, &scratch.data(), &scratch.policies())?;
        let took = load::wait_for_200(
            &format!("{}/fn/cold-0", server.url),
            started,
            Duration::from_secs(60),
        )?;
        restarts.push(took);
        server.stop();
    }
    eprintln!(
        "upload -> 200: {:?}; restart -> 200: {:?}",
        median(&uploads),
        median(&restarts)
    );
    report.cold(&uploads, &restarts);
    Ok(())
}

/// Many functions: start time, memory, and invoking random ones.
fn scale(settings: &Settings, report: &mut Report) -> Result<()> {
    let hello = settings.component("hello")?;
    let scratch = Scratch::new("scale")?;
    let server = servers::lichen(&settings.lichen, &scratch.data(), &scratch.policies())?;
    let deploying = Instant::now();
    for i in 0..settings.functions {
        let name = format!("f{i}");
        servers::deploy(
            &server.url,
            &name,
            &servers::distinct_component(&hello, &name),
        )?;
    }
    let deploy_time = deploying.elapsed();
    server.stop();

    let mut starts = Vec::new();
    let mut rss_start = Vec::new();
    for _ in 0..settings.rounds {
        let started = Instant::now();
        let server = servers::lichen(&settings.lichen, &scratch.data(), &scratch.policies())?;
        starts.push(started.elapsed());
        rss_start.push(server.rss_bytes()?);
        server.stop();
    }

    let server = servers::lichen(&settings.lichen, &scratch.data(), &scratch.policies())?;
    let calls = if settings.smoke { 200 } else { 2_000 };
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut latencies = Vec::with_capacity(calls);
    for _ in 0..calls {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let i = (seed % settings.functions as u64) as usize;
        let started = Instant::now();
        let status = load::blocking_request("GET", &format!("{}/fn/f{i}", server.url), None, b"")?;
        latencies.push(started.elapsed());
        if status != 200 {
            bail!("f{i} answered {status}");
        }
    }
    let rss_after = server.rss_bytes()?;
    server.stop();
    eprintln!(
        "{} functions: start {:?}, RSS {} MiB at start, {} MiB after {calls} random calls",
        settings.functions,
        median(&starts),
        median(&rss_start) >> 20,
        rss_after >> 20
    );
    report.scale(
        settings.functions,
        deploy_time,
        &starts,
        &rss_start,
        rss_after,
        &latencies,
    );
    Ok(())
}

/// The map API over `square`: one host alone, then three hosts in a
/// cluster (all on this machine's cores), alternating.
fn map(settings: &Settings, report: &mut Report) -> Result<()> {
    let items = if settings.smoke { 1_000 } else { 20_000 };
    let inputs: Vec<u64> = (0..items).collect();
    let body = serde_json::to_vec(&inputs)?;
    let square = settings.component("square")?;
    let mut runs: Vec<(usize, Duration)> = Vec::new();
    for _ in 0..settings.rounds {
        for hosts in [1usize, 3] {
            let scratches: Vec<Scratch> = (0..hosts)
                .map(|i| Scratch::new(&format!("map-{hosts}-{i}")))
                .collect::<Result<_>>()?;
            let mut servers: Vec<servers::Server> = Vec::new();
            let mut seed: Option<String> = None;
            for scratch in &scratches {
                let mut extra = Vec::new();
                if hosts > 1 {
                    let gossip = std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?;
                    extra.extend([
                        "--gossip".to_string(),
                        gossip.to_string(),
                        "--node-id".to_string(),
                        format!("n{}", servers.len()),
                        "--cluster-secret".to_string(),
                        "bench-cluster-secret-0123456789".to_string(),
                        "--gossip-interval-ms".to_string(),
                        "100".to_string(),
                    ]);
                    if let Some(seed) = &seed {
                        extra.extend(["--peer".to_string(), seed.clone()]);
                    } else {
                        seed = Some(gossip.to_string());
                    }
                }
                servers.push(servers::lichen_with(
                    &settings.lichen,
                    &scratch.data(),
                    &scratch.policies(),
                    &extra,
                )?);
            }
            servers::deploy(&servers[0].url, "square", &square)?;
            for server in &servers {
                load::wait_for_200_post(&format!("{}/fn/square", server.url), b"2")?;
            }
            // Let every host see the others serve it.
            std::thread::sleep(Duration::from_millis(if hosts > 1 { 1_000 } else { 0 }));
            let url = format!("{}/v1/functions/square/map", servers[0].url);
            let started = Instant::now();
            let status = load::blocking_request("POST", &url, None, &body)?;
            let took = started.elapsed();
            if status != 200 {
                bail!("map on {hosts} hosts answered {status}");
            }
            eprintln!("map of {items} over {hosts} host(s): {took:?}");
            runs.push((hosts, took));
            for server in servers {
                server.stop();
            }
        }
    }
    report.map(items, &runs);
    Ok(())
}
