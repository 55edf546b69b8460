//! What a person looking at a host wants and Prometheus counters do not
//! keep: per function, its last invocations, the latencies of the last
//! minute, requests per ten seconds over the last ten minutes, and the
//! guest's last log lines. In memory, bounded per function, gone on restart;
//! `GET /v1/status` reads it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// Invocations kept per function.
pub const KEEP_INVOCATIONS: usize = 100;
/// Guest log lines kept per function.
pub const KEEP_LOG_LINES: usize = 100;
/// The window latencies and the current rate are computed over.
const LATENCY_WINDOW: Duration = Duration::from_secs(60);
/// Latency samples kept per function within the window, at most: beyond
/// it the oldest go first (quantiles then cover less than a minute).
pub const MAX_SAMPLES: usize = 20_000;
/// The width and count of the rate history's buckets: ten minutes.
const BUCKET: Duration = Duration::from_secs(10);
const BUCKETS: usize = 60;
/// The window of the current rate.
const RATE_WINDOW: Duration = Duration::from_secs(10);

/// One finished invocation, as the status page lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Invocation {
    pub request_id: String,
    pub status: u16,
    pub outcome: &'static str,
    pub duration_us: u64,
    pub at_unix_ms: u64,
}

/// One line a guest wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogLine {
    pub request_id: String,
    pub stream: &'static str,
    pub line: String,
    pub at_unix_ms: u64,
}

/// A function's recent numbers, computed when asked.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// Over the last ten seconds.
    pub requests_per_second: f64,
    /// Over the last minute; `None` without a request in it.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Requests per ten seconds, oldest first, the last ten minutes.
    pub history: Vec<u32>,
}

#[derive(Default)]
struct FunctionRecent {
    invocations: VecDeque<Invocation>,
    samples: VecDeque<(Instant, Duration)>,
    /// Requests per bucket; `bucket_at` is when the last bucket began.
    buckets: VecDeque<u32>,
    bucket_at: Option<Instant>,
    log: VecDeque<LogLine>,
}

impl FunctionRecent {
    /// Moves the bucket ring on to `now`, opening empty buckets for the
    /// time that passed.
    fn advance(&mut self, now: Instant) {
        let Some(mut at) = self.bucket_at else {
            self.buckets.push_back(0);
            self.bucket_at = Some(now);
            return;
        };
        let mut opened = 0;
        while now.duration_since(at) >= BUCKET && opened <= BUCKETS {
            at += BUCKET;
            self.buckets.push_back(0);
            opened += 1;
        }
        if opened > BUCKETS {
            // Idle for longer than the history: start afresh.
            self.buckets.clear();
            self.buckets.push_back(0);
            at = now;
        }
        while self.buckets.len() > BUCKETS {
            self.buckets.pop_front();
        }
        self.bucket_at = Some(at);
    }

    fn forget_old_samples(&mut self, now: Instant) {
        while self
            .samples
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > LATENCY_WINDOW)
        {
            self.samples.pop_front();
        }
    }
}

/// The recent history of every function of a host: a lock per function,
/// so invocations of different functions never wait on each other, and the
/// invocation path holds its function's history (see [`Recent::history`])
/// instead of looking it up.
pub struct Recent {
    functions: Mutex<HashMap<String, History>>,
}

/// One function's recent history.
#[derive(Clone, Default)]
pub struct History(Arc<Mutex<FunctionRecent>>);

impl History {
    fn with<R>(&self, f: impl FnOnce(&mut FunctionRecent) -> R) -> R {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Records a finished invocation.
    pub fn invocation(&self, invocation: Invocation, duration: Duration) {
        self.invocation_at(invocation, duration, Instant::now());
    }

    fn invocation_at(&self, invocation: Invocation, duration: Duration, now: Instant) {
        self.with(|recent| {
            recent.advance(now);
            if let Some(last) = recent.buckets.back_mut() {
                *last = last.saturating_add(1);
            }
            recent.samples.push_back((now, duration));
            if recent.samples.len() > MAX_SAMPLES {
                recent.samples.pop_front();
            }
            recent.forget_old_samples(now);
            recent.invocations.push_back(invocation);
            if recent.invocations.len() > KEEP_INVOCATIONS {
                recent.invocations.pop_front();
            }
        });
    }
}

impl Default for Recent {
    fn default() -> Self {
        Recent::new()
    }
}

impl Recent {
    pub fn new() -> Recent {
        Recent {
            functions: Mutex::new(HashMap::new()),
        }
    }

    /// `function`'s history, to record into without a lookup each time.
    pub fn history(&self, function: &str) -> History {
        let mut functions = self.functions.lock().unwrap_or_else(|e| e.into_inner());
        // Looked up before inserting: the name is copied once per function.
        if let Some(history) = functions.get(function) {
            return history.clone();
        }
        functions.entry(function.to_string()).or_default().clone()
    }

    fn with<R>(&self, function: &str, f: impl FnOnce(&mut FunctionRecent) -> R) -> R {
        self.history(function).with(f)
    }

    /// Records a finished invocation.
    pub fn invocation(&self, function: &str, invocation: Invocation, duration: Duration) {
        self.history(function).invocation(invocation, duration);
    }

    /// Records a line the guest wrote.
    pub fn log_line(&self, function: &str, line: LogLine) {
        self.with(function, |recent| {
            recent.log.push_back(line);
            if recent.log.len() > KEEP_LOG_LINES {
                recent.log.pop_front();
            }
        });
    }

    /// The function's numbers now.
    pub fn summary(&self, function: &str) -> Summary {
        self.summary_at(function, Instant::now())
    }

    fn summary_at(&self, function: &str, now: Instant) -> Summary {
        // Copied under the lock, sorted outside it: recording invocations
        // waits on the lock, and a minute of samples takes a while to sort.
        let (in_rate_window, mut latencies, buckets) = self.with(function, |recent| {
            recent.advance(now);
            recent.forget_old_samples(now);
            let in_rate_window = recent
                .samples
                .iter()
                .rev()
                .take_while(|(at, _)| now.duration_since(*at) <= RATE_WINDOW)
                .count();
            let latencies: Vec<Duration> = recent.samples.iter().map(|(_, d)| *d).collect();
            let buckets: Vec<u32> = recent.buckets.iter().copied().collect();
            (in_rate_window, latencies, buckets)
        });
        latencies.sort_unstable();
        let quantile = |q: f64| {
            let last = latencies.len().checked_sub(1)?;
            let index = ((last as f64) * q).round() as usize;
            latencies
                .get(index.min(last))
                .map(|d| d.as_secs_f64() * 1000.0)
        };
        let mut history = vec![0; BUCKETS.saturating_sub(buckets.len())];
        history.extend(buckets);
        Summary {
            requests_per_second: in_rate_window as f64 / RATE_WINDOW.as_secs_f64(),
            p50_ms: quantile(0.5),
            p99_ms: quantile(0.99),
            history,
        }
    }

    /// The function's last invocations, newest first.
    pub fn invocations(&self, function: &str) -> Vec<Invocation> {
        self.with(function, |recent| {
            recent.invocations.iter().rev().cloned().collect()
        })
    }

    /// The guest's last log lines, oldest first.
    pub fn log(&self, function: &str) -> Vec<LogLine> {
        self.with(function, |recent| recent.log.iter().cloned().collect())
    }

    /// Forgets a deleted function.
    pub fn forget(&self, function: &str) {
        self.functions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(function);
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(id: usize) -> Invocation {
        Invocation {
            request_id: format!("r{id}"),
            status: 200,
            outcome: "ok",
            duration_us: 0,
            at_unix_ms: 0,
        }
    }

    #[test]
    fn quantiles_rates_and_history_come_from_what_was_recorded() {
        let recent = Recent::new();
        let history = recent.history("f");
        let start = Instant::now();
        // 100 calls of 1..=100 ms over five seconds.
        for i in 1..=100u64 {
            let at = start + Duration::from_millis(i * 50);
            history.invocation_at(call(i as usize), Duration::from_millis(i), at);
        }
        let now = start + Duration::from_secs(5);
        let summary = recent.summary_at("f", now);
        assert_eq!(summary.p50_ms, Some(51.0));
        assert_eq!(summary.p99_ms, Some(99.0));
        assert_eq!(summary.requests_per_second, 10.0);
        assert_eq!(summary.history.len(), BUCKETS);
        assert_eq!(summary.history.iter().sum::<u32>(), 100);
        // Two minutes later: no latencies, no rate, the calls still in the history.
        let later = recent.summary_at("f", now + Duration::from_secs(120));
        assert_eq!(later.p50_ms, None);
        assert_eq!(later.requests_per_second, 0.0);
        assert_eq!(later.history.iter().sum::<u32>(), 100);
        assert_eq!(later.history.len(), BUCKETS);
        // An hour later the history is empty too.
        let idle = recent.summary_at("f", now + Duration::from_secs(3600));
        assert_eq!(idle.history.iter().sum::<u32>(), 0);
        assert_eq!(idle.history.len(), BUCKETS);
    }

    #[test]
    fn invocations_and_log_lines_are_bounded_and_newest_first() {
        let recent = Recent::new();
        for i in 0..250 {
            recent.invocation("f", call(i), Duration::from_millis(1));
            recent.log_line(
                "f",
                LogLine {
                    request_id: format!("r{i}"),
                    stream: "stdout",
                    line: format!("line {i}"),
                    at_unix_ms: 0,
                },
            );
        }
        let calls = recent.invocations("f");
        assert_eq!(calls.len(), KEEP_INVOCATIONS);
        assert_eq!(calls[0].request_id, "r249");
        let log = recent.log("f");
        assert_eq!(log.len(), KEEP_LOG_LINES);
        assert_eq!(log.last().unwrap().line, "line 249");
        recent.forget("f");
        assert!(recent.invocations("f").is_empty());
    }
}
