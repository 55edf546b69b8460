//! The results as Markdown: the machine, the versions, the commands, and per
//! scenario the medians, the ratios against the baselines measured in the
//! same run, and whether each goal held.

use std::fmt::Write;
use std::process::Command;
use std::time::Duration;

use anyhow::Result;

use crate::Settings;
use crate::inproc::{CallTimes, Workload};
use crate::load::{OpenLoopResult, WrkResult};

/// The median of a non-empty list (the lower middle for even lengths);
/// the default for an empty one.
pub fn median<T: Ord + Copy + Default>(values: &[T]) -> T {
    let mut sorted = values.to_vec();
    sorted.sort();
    sorted
        .get(sorted.len().saturating_sub(1) / 2)
        .copied()
        .unwrap_or_default()
}

/// The `p` quantile (0..=1) of a list of durations.
pub fn percentile(values: &[Duration], p: f64) -> Duration {
    let mut sorted = values.to_vec();
    sorted.sort();
    let index = ((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1));
    sorted.get(index).copied().unwrap_or_default()
}

fn median_f64(values: impl Iterator<Item = f64>) -> Option<f64> {
    let mut sorted: Vec<f64> = values.collect();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len().checked_sub(1)? / 2).copied()
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

fn ns(d: Duration) -> String {
    format!("{} ns", d.as_nanos())
}

fn goal(ok: bool) -> &'static str {
    if ok { "met" } else { "**not met**" }
}

pub struct Report {
    header: String,
    sections: Vec<String>,
    rps: Vec<(&'static str, f64)>,
    goals: Vec<String>,
}

fn command_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_else(|| "not found".to_string())
}

impl Report {
    pub fn new(settings: &Settings) -> Result<Self> {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
            .unwrap_or_else(|| "unknown".to_string());
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        let lichen = command_line(&settings.lichen.to_string_lossy(), &["--version"]);
        let wasmtime = settings.wasmtime.as_ref().map_or_else(
            || "not installed (its scenarios were skipped)".to_string(),
            |bin| command_line(&bin.to_string_lossy(), &["--version"]),
        );
        let mut header = String::new();
        let _ = writeln!(header, "# Lichen benchmark results\n");
        if settings.smoke {
            let _ = writeln!(
                header,
                "**Smoke run** (about a second per scenario, one round): checks the harness, not the figures.\n"
            );
        }
        let _ = writeln!(
            header,
            "Produced by `bench/run.sh{}` (which runs `target/release/lichen-bench all{}`).\n",
            if settings.smoke { " --smoke" } else { "" },
            if settings.smoke { " --smoke" } else { "" }
        );
        let _ = writeln!(header, "| | |\n| --- | --- |");
        let _ = writeln!(header, "| machine | {cores} cores, {model} |");
        let _ = writeln!(header, "| lichen | {lichen} (release build) |");
        let _ = writeln!(header, "| wasmtime serve | {wasmtime} |");
        let _ = writeln!(
            header,
            "| rustc | {} |",
            command_line("rustc", &["--version"])
        );
        let _ = writeln!(
            header,
            "| load | {} , `-t1 -c{}`; open loop: lichen-bench's own generator |",
            command_line("wrk", &["-v"]),
            settings.connections
        );
        let _ = writeln!(
            header,
            "| method | every figure is the median of {} rounds, servers alternating A B C A B C; nothing is pinned: the load tool and the server share the {cores} cores the same way for every server |",
            settings.rounds
        );
        Ok(Report {
            header,
            sections: Vec::new(),
            rps: Vec::new(),
            goals: Vec::new(),
        })
    }

    pub fn median_rps(&self, kind: &str) -> Option<f64> {
        self.rps.iter().find(|(k, _)| *k == kind).map(|(_, r)| *r)
    }

    pub fn throughput(&mut self, runs: &[(&'static str, WrkResult)]) {
        let mut s = String::from(
            "## hello: throughput and latency (closed loop)\n\nThe same hello component in Lichen and in `wasmtime serve`; the native server answers the same text from Rust.\n\n| server | req/s | p50 | p99 | errors |\n| --- | ---: | ---: | ---: | ---: |\n",
        );
        let medians = median_rows(&mut s, runs, &["lichen", "wasmtime serve", "native hyper"]);
        for (kind, rps, _) in &medians {
            self.rps.push((kind, *rps));
        }
        let get = |k: &str| {
            medians
                .iter()
                .find(|(kind, ..)| *kind == k)
                .map(|(_, r, p)| (*r, *p))
        };
        if let Some((lichen, lichen_p99)) = get("lichen") {
            if let Some((wasmtime, wasmtime_p99)) = get("wasmtime serve") {
                let ratio = lichen / wasmtime;
                let _ = writeln!(
                    s,
                    "\nLichen / wasmtime serve: **{ratio:.2}x** req/s, p99 {lichen_p99:.2} ms vs {wasmtime_p99:.2} ms."
                );
                self.goals.push(format!(
                    "hello req/s >= 1.3x wasmtime serve: {ratio:.2}x, {}",
                    goal(ratio >= 1.3)
                ));
                self.goals.push(format!(
                    "hello p99 <= wasmtime serve's: {lichen_p99:.2} ms vs {wasmtime_p99:.2} ms, {}",
                    goal(lichen_p99 <= wasmtime_p99)
                ));
            }
            if let Some((native, _)) = get("native hyper") {
                let ratio = lichen / native;
                let _ = writeln!(s, "\nLichen / native hyper: **{ratio:.2}x** req/s.");
                self.goals.push(format!(
                    "hello req/s >= 0.5x native hyper: {ratio:.2}x, {}",
                    goal(ratio >= 0.5)
                ));
            }
        }
        self.sections.push(s);
    }

    /// WASIp3 hello: Lichen and `wasmtime serve` at the same reuse settings,
    /// and both with a fresh instance per request, against native hyper.
    pub fn p3_throughput(&mut self, runs: &[(&'static str, WrkResult)]) {
        let mut s = String::from(
            "## WASIp3 hello: instance reuse and fresh instances (closed loop)\n\nThe same `hello-p3` component (`hello` built with the SDK's `p3` feature). *reuse*: 128 requests per instance, 16 at once (`wasmtime serve`'s defaults for p3; Lichen's `[instances] reuse = 128, concurrency = 16`); *fresh*: one instance per request (`--max-instance-reuse-count 1`; Lichen's default).\n\n| server | req/s | p50 | p99 | errors |\n| --- | ---: | ---: | ---: | ---: |\n",
        );
        let medians = median_rows(
            &mut s,
            runs,
            &[
                "lichen p3 reuse",
                crate::BASELINE_P3_REUSE,
                "wasmtime serve p3 reuse",
                "lichen p3 fresh",
                "wasmtime serve p3 fresh",
                "native hyper",
            ],
        );
        let get = |k: &str| {
            medians
                .iter()
                .find(|(kind, ..)| *kind == k)
                .map(|(_, r, p)| (*r, *p))
        };
        let native = get("native hyper").map(|(r, _)| r);
        if let (Some((ours, ours_p99)), Some((before, before_p99))) =
            (get("lichen p3 reuse"), get(crate::BASELINE_P3_REUSE))
        {
            let _ = writeln!(
                s,
                "\nReuse, this build / the baseline build (`LICHEN_BASELINE_BIN`): **{:.2}x** req/s, p99 {ours_p99:.2} ms vs {before_p99:.2} ms.",
                ours / before
            );
        }
        if let (Some((ours, ours_p99)), Some((theirs, theirs_p99))) =
            (get("lichen p3 reuse"), get("wasmtime serve p3 reuse"))
        {
            let ratio = ours / theirs;
            let _ = writeln!(
                s,
                "\nReuse, Lichen / wasmtime serve: **{ratio:.2}x** req/s, p99 {ours_p99:.2} ms vs {theirs_p99:.2} ms."
            );
            self.goals.push(format!(
                "p3 reuse req/s >= 1.3x wasmtime serve at the same settings: {ratio:.2}x, {}",
                goal(ratio >= 1.3)
            ));
            self.goals.push(format!(
                "p3 reuse p99 <= wasmtime serve's: {ours_p99:.2} ms vs {theirs_p99:.2} ms, {}",
                goal(ours_p99 <= theirs_p99)
            ));
            if let Some(native) = native {
                let ratio = ours / native;
                let _ = writeln!(s, "\nReuse, Lichen / native hyper: **{ratio:.2}x** req/s.");
                self.goals.push(format!(
                    "p3 reuse req/s >= 0.5x native hyper: {ratio:.2}x, {}",
                    goal(ratio >= 0.5)
                ));
            }
        }
        if let (Some((ours, ours_p99)), Some((theirs, theirs_p99))) =
            (get("lichen p3 fresh"), get("wasmtime serve p3 fresh"))
        {
            let ratio = ours / theirs;
            let _ = writeln!(
                s,
                "\nFresh, Lichen / wasmtime serve: **{ratio:.2}x** req/s, p99 {ours_p99:.2} ms vs {theirs_p99:.2} ms."
            );
            self.goals.push(format!(
                "p3 fresh p99 <= wasmtime serve's: {ours_p99:.2} ms vs {theirs_p99:.2} ms, {}",
                goal(ours_p99 <= theirs_p99)
            ));
        }
        self.sections.push(s);
    }

    pub fn open_loop(&mut self, rate: f64, runs: &[(&'static str, OpenLoopResult)]) {
        let mut s = format!(
            "## hello: latency at a fixed rate (open loop)\n\n{rate:.0} requests/s (half of the closed-loop baseline) over 64 connections; latency counts from each request's scheduled time, so a stalled server cannot hide its queue (coordinated omission corrected, as wrk2 does).\n\n| server | p50 | p99 | failed |\n| --- | ---: | ---: | ---: |\n"
        );
        for kind in ["lichen", "wasmtime serve"] {
            let of_kind: Vec<&OpenLoopResult> = runs
                .iter()
                .filter(|(k, _)| *k == kind)
                .map(|(_, r)| r)
                .collect();
            if let (Some(p50), Some(p99)) = (
                median_f64(of_kind.iter().map(|r| r.p50_ms)),
                median_f64(of_kind.iter().map(|r| r.p99_ms)),
            ) {
                let failed: usize = of_kind.iter().map(|r| r.failed).sum();
                let sent: usize = of_kind.iter().map(|r| r.sent).sum();
                let _ = writeln!(
                    s,
                    "| {kind} | {p50:.2} ms | {p99:.2} ms | {failed} of {sent} |"
                );
            }
        }
        self.sections.push(s);
    }

    pub fn instantiate(&mut self, iterations: usize, times: &CallTimes) {
        let p50 = percentile(&times.total, 0.5);
        let p99 = percentile(&times.total, 0.99);
        let rest: Vec<Duration> = times
            .total
            .iter()
            .zip(&times.instantiate)
            .map(|(total, instantiate)| total.saturating_sub(*instantiate))
            .collect();
        self.sections.push(format!(
            "## instantiate + call, in process\n\nA fresh instance of hello from its pre-instantiated component, the call, and the response body read, through the host library (no HTTP), {iterations} times after a warm-up. The instantiation alone is the time the host records for it; the rest is the sandbox set-up, the guest's call with its host calls, the response body and the store's teardown (the pool resets the memory the guest dirtied).\n\n| p50 | p99 | instantiation alone, p50 | the rest, p50 |\n| ---: | ---: | ---: | ---: |\n| {} | {} | {} | {} |\n",
            us(p50),
            us(p99),
            us(percentile(&times.instantiate, 0.5)),
            us(percentile(&rest, 0.5)),
        ));
        self.goals.push(format!(
            "instantiate + call p50 <= 20 µs: {}, {}",
            us(p50),
            goal(p50 <= Duration::from_micros(20))
        ));
    }

    /// The status page history's costs beside the per-request work of
    /// hello (`call`: instantiate + call p50 of the same run).
    pub fn history(&mut self, times: &crate::history::HistoryTimes, call: Duration) {
        let record = median(&times.record);
        let two = median(&times.record_two_threads);
        let summary = median(&times.summary_full);
        let ratio = |d: Duration| 100.0 * d.as_secs_f64() / call.as_secs_f64().max(1e-12);
        self.sections.push(format!(
            "## status page history, in process\n\nWhat `GET /v1/status` reads is recorded on every invocation (`host/src/recent.rs`): the request id copied, one lock, the pushes into the function's rings. Timed in batches of 1,000 after the rings are full; the figure is the median batch's time per call. The summary is what the status endpoint computes per function, here with the minute's latency window full ({} samples); the copy is made under the lock and sorted outside it. The baseline is the instantiate + call p50 of hello from the same run.\n\n| | p50 | against instantiate + call ({}) |\n| --- | ---: | ---: |\n| recording one invocation | {} | {:.1}% |\n| recording, two threads at once | {} | {:.1}% |\n| one function's summary, full window | {} | |\n",
            lichen::recent::MAX_SAMPLES,
            us(call),
            ns(record),
            ratio(record),
            ns(two),
            ratio(two),
            us(summary),
        ));
    }

    pub fn seal(&mut self, rows: &[crate::seal::Row], call: Duration) {
        let mut table = String::new();
        for row in rows {
            let _ = writeln!(
                table,
                "| {} | {} | {} | {:.1}x | {:.1}% |",
                row.what,
                ns(row.before),
                ns(row.now),
                row.now.as_secs_f64() / row.before.as_secs_f64().max(1e-12),
                100.0 * row.now.as_secs_f64() / call.as_secs_f64().max(1e-12),
            );
        }
        self.sections.push(format!(
            "## the cluster plane's sealing and signing, in process\n\nCPU per operation, sender and receiver together, medians of batches of {} (`bench/src/seal.rs`). Gossip: a datagram sealed (ChaCha20-Poly1305) and opened with its replay check, against the per-value HMAC-SHA256 made and checked for the same bytes before (values of about 120 bytes). A peer request: signed, verified and its nonce taken, against the static token's constant-time comparison before. The last column sets each against the instantiate + call p50 of hello from the same run ({}).\n\n| | before | now | now / before | against instantiate + call |\n| --- | ---: | ---: | ---: | ---: |\n{table}",
            200,
            us(call),
        ));
    }

    pub fn compute(&mut self, results: &[(Workload, Vec<Duration>, Vec<Duration>)]) {
        let mut rows = String::new();
        let mut verdicts = Vec::new();
        for (workload, wasm, native) in results {
            let (w, nat) = (median(wasm), median(native));
            let ratio = w.as_secs_f64() / nat.as_secs_f64().max(1e-9);
            let _ = writeln!(
                rows,
                "| {} (`{}`, {}) | {} | {} | **{ratio:.2}x** |",
                workload.label,
                workload.function,
                workload.kind,
                ms(w),
                ms(nat)
            );
            verdicts.push(format!(
                "{} ({}) {ratio:.2}x, {}",
                workload.label,
                workload.kind,
                goal(ratio <= 1.3)
            ));
        }
        self.sections.push(format!(
            "## compute: wasm vs native\n\nEach workload in wasm through the host (a fresh instance included) and the same source file (`functions/<function>/src/compute.rs`) compiled natively into the benchmark, both at opt-level 3, alternating; the answers are compared.\n\n| workload | wasm | native | wasm / native |\n| --- | ---: | ---: | ---: |\n{rows}"
        ));
        self.goals
            .push(format!("compute <= 1.3x native: {}", verdicts.join("; ")));
    }

    pub fn cold(&mut self, uploads: &[Duration], restarts: &[Duration]) {
        self.sections.push(format!(
            "## cold paths\n\n| path | median | all runs |\n| --- | ---: | --- |\n| upload -> first 200 (compile included) | {} | {} |\n| restart -> first 200 (process start, compiled code from the cache) | {} | {} |\n",
            ms(median(uploads)),
            uploads.iter().map(|d| ms(*d)).collect::<Vec<_>>().join(", "),
            ms(median(restarts)),
            restarts.iter().map(|d| ms(*d)).collect::<Vec<_>>().join(", "),
        ));
    }

    pub fn scale(
        &mut self,
        functions: usize,
        deploy_time: Duration,
        starts: &[Duration],
        rss_start: &[u64],
        rss_after: u64,
        latencies: &[Duration],
    ) {
        let start = median(starts);
        let rss = median(rss_start);
        let mib = |b: u64| format!("{:.1} MiB", b as f64 / f64::from(1u32 << 20));
        self.sections.push(format!(
            "## scale: {functions} functions\n\n{functions} distinct copies of hello (each with its own hash, so each compiled and cached on its own), deployed in {:.1} s. Then the host is restarted: start is from process spawn to listening; code loads lazily on a function's first call, and at most 256 functions keep their code loaded (the least recently called are unloaded, `ServeConfig::max_loaded_functions`). Random functions are then called one at a time over HTTP: with 1000 functions and 256 loaded, most calls load code from the cache first (about a millisecond), which is what the p50 shows.\n\n| start | RSS after start | RSS after {} random calls | random call p50 | p99 |\n| ---: | ---: | ---: | ---: | ---: |\n| {} | {} | {} | {} | {} |\n",
            deploy_time.as_secs_f64(),
            latencies.len(),
            ms(start),
            mib(rss),
            mib(rss_after),
            ms(percentile(latencies, 0.5)),
            ms(percentile(latencies, 0.99)),
        ));
        self.goals.push(format!(
            "{functions} functions: start <= 1 s: {}, {}",
            ms(start),
            goal(start <= Duration::from_secs(1))
        ));
        self.goals.push(format!(
            "{functions} functions: RSS <= 256 MiB: {} at start, {} after calls, {}",
            mib(rss),
            mib(rss_after),
            goal(rss.max(rss_after) <= 256 << 20)
        ));
    }

    pub fn map(&mut self, items: u64, runs: &[(usize, Duration)]) {
        let of = |hosts: usize| -> Vec<Duration> {
            runs.iter().filter(|r| r.0 == hosts).map(|r| r.1).collect()
        };
        let (one, three) = (median(&of(1)), median(&of(3)));
        let rate = |d: Duration| items as f64 / d.as_secs_f64().max(1e-9);
        self.sections.push(format!(
            "## map: {items} items over `square`\n\n`POST /v1/functions/square/map` with {items} numbers, sent to the first host; one host alone, then three hosts in a cluster, alternating. The three hosts run on this machine's same two cores, so the cluster cannot add compute here: the figure shows what spreading costs (forwarding over loopback HTTP) rather than what it gains on separate machines.\n\n| hosts | median | items/s | all runs |\n| ---: | ---: | ---: | --- |\n| 1 | {} | {:.0} | {} |\n| 3 | {} | {:.0} | {} |\n\n3 hosts / 1 host, items/s: {:.2}x\n",
            ms(one),
            rate(one),
            of(1).iter().map(|d| ms(*d)).collect::<Vec<_>>().join(", "),
            ms(three),
            rate(three),
            of(3).iter().map(|d| ms(*d)).collect::<Vec<_>>().join(", "),
            rate(three) / rate(one),
        ));
    }

    pub fn outbound(&mut self, runs: &[(&'static str, WrkResult, usize)]) {
        let mut s = String::from(
            "## Outbound HTTP: pooled connections (closed loop)\n\n`probe` fetching from a native hyper upstream on loopback for each request, wrk -t1 -c64, medians; *connection per request* is the same host with `--outbound-no-keep-alive` (what every outbound request did before the pool). TIME_WAIT: sockets in that state the run left behind (`/proc/net/tcp*`).\n\n| outbound | req/s | p50 | p99 | errors | TIME_WAIT |\n| --- | ---: | ---: | ---: | ---: | ---: |\n",
        );
        let mut medians = Vec::new();
        for kind in ["pooled", "connection per request"] {
            let of_kind: Vec<&(&str, WrkResult, usize)> =
                runs.iter().filter(|(k, ..)| *k == kind).collect();
            let Some(Medians {
                rps,
                p50,
                p99,
                errors,
            }) = medians_of(of_kind.iter().map(|(_, r, _)| r))
            else {
                continue;
            };
            let mut waits: Vec<usize> = of_kind.iter().map(|(.., w)| *w).collect();
            waits.sort_unstable();
            let time_wait = waits.get(waits.len() / 2).copied().unwrap_or(0);
            let _ = writeln!(
                s,
                "| {kind} | {rps:.0} | {p50:.2} ms | {p99:.2} ms | {errors} | {time_wait} |"
            );
            medians.push((kind, rps, time_wait));
        }
        if let [(_, pooled, pooled_wait), (_, fresh, _)] = medians[..] {
            let ratio = pooled / fresh;
            let _ = writeln!(
                s,
                "\nPooled / connection per request: **{ratio:.2}x** req/s."
            );
            self.goals.push(format!(
                "outbound req/s pooled >= 10x a connection per request: {ratio:.2}x, {}",
                goal(ratio >= 10.0)
            ));
            self.goals.push(format!(
                "no TIME_WAIT pile-up with the pool: {pooled_wait} sockets left, {}",
                goal(pooled_wait < 100)
            ));
        }
        self.sections.push(s);
    }

    pub fn tracing(&mut self, runs: &[(&'static str, WrkResult)]) {
        let mut s = String::from(
            "## The cost of tracing (closed loop)\n\n`hello`, wrk -t1 -c64, medians; *traced*: every invocation traced (`--trace-sampling 1.0`: a span per invocation and its admission, guest and instantiation children), exported over OTLP/HTTP protobuf to a native hyper server on loopback; *off*: the same host without `--otlp-endpoint`.\n\n| tracing | req/s | p50 | p99 | errors |\n| --- | ---: | ---: | ---: | ---: |\n",
        );
        let mut medians = Vec::new();
        for kind in ["off", "traced"] {
            let Some(Medians {
                rps,
                p50,
                p99,
                errors,
            }) = medians_of(runs.iter().filter(|(k, _)| *k == kind).map(|(_, r)| r))
            else {
                continue;
            };
            let _ = writeln!(
                s,
                "| {kind} | {rps:.0} | {p50:.2} ms | {p99:.2} ms | {errors} |"
            );
            medians.push(rps);
        }
        if let [off, traced] = medians[..] {
            let cost = (1.0 - traced / off) * 100.0;
            let _ = writeln!(
                s,
                "\nTraced / off: {:.3}x req/s ({cost:.1}% fewer).",
                traced / off
            );
            self.goals.push(format!(
                "tracing at sampling 1.0 costs under 5% of hello's req/s: {cost:.1}%, {}",
                goal(cost < 5.0)
            ));
        }
        self.sections.push(s);
    }

    /// Messages per second through a NATS trigger against a native
    /// consumer of the same stream.
    pub fn queue(&mut self, messages: u64, runs: &[(&'static str, f64)]) {
        let mut s = format!(
            "## Messages from NATS JetStream\n\n{messages} messages published at once to a stream of one `nats-server` (JetStream, file storage) on loopback, timed from the first publish until the consumer has acknowledged them all; alternating rounds, medians. *lichen*: `hello` with `[[triggers.nats]]` (`max_inflight = 64`), each message a fresh instance, acknowledged after NATS confirms it; *native*: an async-nats pull consumer in this process acknowledging each message the same way, 64 at once, without running anything.\n\n| consumer | messages/s (rounds) | median |\n| --- | --- | ---: |\n"
        );
        let mut medians = Vec::new();
        for kind in ["native", "lichen"] {
            let rates: Vec<f64> = runs
                .iter()
                .filter(|(k, _)| *k == kind)
                .map(|(_, r)| *r)
                .collect();
            let Some(median) = median_f64(rates.iter().copied()) else {
                continue;
            };
            let rounds: Vec<String> = rates.iter().map(|r| format!("{r:.0}")).collect();
            let _ = writeln!(s, "| {kind} | {} | {median:.0} |", rounds.join(" / "));
            medians.push(median);
        }
        if let [native, lichen] = medians[..] {
            let _ = writeln!(s, "\nLichen / native: {:.2}x.", lichen / native);
        }
        self.sections.push(s);
    }

    pub fn kv(&mut self, runs: &[(String, WrkResult)]) {
        let mut s = String::from(
            "## Key-value state through HTTP (closed loop)\n\nOne host, wrk -t1 -c64, each backend in turn per round, medians. *counter increment*: `counter` on 100 paths (an atomic increment each); *set 1 KiB* / *get 1 KiB*: `kv-draft` over 1,000 keys; *hello*: the same host's baseline. *local*: redb in the data directory (each write acknowledged after its group's fsync); *nats*: one `nats-server` with JetStream on loopback (file storage, one replica; reads through the stream leader, writes compare-and-swap).\n\n| workload | req/s | p50 | p99 | errors | vs hello |\n| --- | ---: | ---: | ---: | ---: | ---: |\n",
        );
        let mut kinds: Vec<&str> = Vec::new();
        for (kind, _) in runs {
            if !kinds.contains(&kind.as_str()) {
                kinds.push(kind);
            }
        }
        let median_of =
            |kind: &str| medians_of(runs.iter().filter(|(k, _)| k == kind).map(|(_, r)| r));
        for kind in kinds {
            let Some(Medians {
                rps,
                p50,
                p99,
                errors,
            }) = median_of(kind)
            else {
                continue;
            };
            let backend = kind.rsplit_once(" (").map_or("", |(_, b)| b);
            let baseline = median_of(&format!("hello ({backend}")).map(|m| m.rps);
            let ratio = baseline.map_or(String::new(), |b| format!("{:.2}x", rps / b));
            let _ = writeln!(
                s,
                "| {kind} | {rps:.0} | {p50:.2} ms | {p99:.2} ms | {errors} | {ratio} |"
            );
        }
        self.sections.push(s);
    }

    pub fn markdown(&self) -> String {
        let mut out = self.header.clone();
        out.push_str("\n## Goals\n\n");
        for g in &self.goals {
            let _ = writeln!(out, "- {g}");
        }
        for section in &self.sections {
            out.push('\n');
            out.push_str(section);
        }
        // The analysis of the goals not met, written by hand from profiles.
        if let Ok(notes) = std::fs::read_to_string("bench/NOTES.md") {
            out.push('\n');
            out.push_str(&notes);
        }
        out
    }
}

/// One table row per kind of server with its median req/s, p50 and p99 over
/// the rounds; returns (kind, req/s, p99) of each kind that ran.
/// Medians of a set of wrk runs: req/s, p50, p99 (ms), and errors summed.
struct Medians {
    rps: f64,
    p50: f64,
    p99: f64,
    errors: u64,
}

fn medians_of<'a>(runs: impl Iterator<Item = &'a WrkResult> + Clone) -> Option<Medians> {
    Some(Medians {
        rps: median_f64(runs.clone().map(|r| r.requests_per_sec))?,
        p50: median_f64(runs.clone().map(|r| r.p50_ms))?,
        p99: median_f64(runs.clone().map(|r| r.p99_ms))?,
        errors: runs.map(|r| r.errors).sum(),
    })
}

fn median_rows(
    s: &mut String,
    runs: &[(&'static str, WrkResult)],
    kinds: &[&'static str],
) -> Vec<(&'static str, f64, f64)> {
    let mut medians = Vec::new();
    for &kind in kinds {
        let of_kind = runs.iter().filter(|(k, _)| *k == kind).map(|(_, r)| r);
        let Some(Medians {
            rps,
            p50,
            p99,
            errors,
        }) = medians_of(of_kind)
        else {
            continue;
        };
        let _ = writeln!(
            s,
            "| {kind} | {rps:.0} | {p50:.2} ms | {p99:.2} ms | {errors} |"
        );
        medians.push((kind, rps, p99));
    }
    medians
}
