//! What the status page's history (`lichen::recent`) costs: recording a
//! finished invocation, as the invocation path does once per request (the
//! request id copied, one lock, the pushes), alone and with two threads
//! recording at once; and reading a function's summary with its minute of
//! latency samples full, as `GET /v1/status` does per function.

use std::hint::black_box;
use std::time::{Duration, Instant};

use lichen::recent::{Invocation, MAX_SAMPLES, Recent, now_unix_ms};

/// Calls timed together; the figure is the batch's time over its calls.
const BATCH: usize = 1_000;

pub struct HistoryTimes {
    /// Per recorded invocation, one batch each, one thread.
    pub record: Vec<Duration>,
    /// Per recorded invocation with two threads recording (two functions).
    pub record_two_threads: Vec<Duration>,
    /// Per summary of a function with `MAX_SAMPLES` latencies in its window.
    pub summary_full: Vec<Duration>,
}

fn record_one(recent: &Recent, function: &str, i: usize) {
    recent.invocation(
        function,
        Invocation {
            // Copied from the request's id, as the invocation path does.
            request_id: black_box("0541fcff00000042").to_string(),
            status: 200,
            outcome: "ok",
            duration_us: 450,
            at_unix_ms: now_unix_ms(),
        },
        Duration::from_micros(450 + (i % 97) as u64),
    );
}

/// Per-call times of `batches` batches of recording.
fn record_batches(recent: &Recent, function: &str, batches: usize) -> Vec<Duration> {
    // Warm: the rings full, as on a host that has been serving.
    for i in 0..BATCH * 2 {
        record_one(recent, function, i);
    }
    (0..batches)
        .map(|b| {
            let started = Instant::now();
            for i in 0..BATCH {
                record_one(recent, function, b * BATCH + i);
            }
            started.elapsed() / BATCH as u32
        })
        .collect()
}

pub fn measure(batches: usize) -> HistoryTimes {
    let recent = Recent::new();
    let record = record_batches(&recent, "hello", batches);

    let shared = Recent::new();
    let record_two_threads = std::thread::scope(|scope| {
        let other = scope.spawn(|| record_batches(&shared, "square", batches));
        let mut mine = record_batches(&shared, "hello", batches);
        mine.extend(other.join().unwrap_or_default());
        mine
    });

    let full = Recent::new();
    for i in 0..MAX_SAMPLES {
        record_one(&full, "busy", i);
    }
    let summary_full = (0..batches.clamp(5, 30))
        .map(|_| {
            let started = Instant::now();
            black_box(full.summary("busy"));
            started.elapsed()
        })
        .collect();
    HistoryTimes {
        record,
        record_two_threads,
        summary_full,
    }
}
