//! The memory limit, measured from outside: a guest that allocates without
//! bound fails at its limit, and the host's resident memory comes back.
//! Alone in its own test binary so no other test's allocations blur the
//! measurement.
#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

#[path = "it/common/mod.rs"]
mod common;

use common::{host_with, write_policy};
use http::StatusCode;

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_bomb_fails_fast_and_its_memory_is_returned() {
    // One test, both builds of the guest in turn: alone in this binary, so
    // no other test's allocations blur the measurement.
    for fixture in ["trap", "trap-p3"] {
        memory_bomb(fixture).await;
    }
}

async fn memory_bomb(fixture: &str) {
    let dir = tempfile::tempdir().unwrap();
    // The bomb fails at the memory limit; the deadline is out of its way.
    write_policy(
        dir.path(),
        "trap",
        "[limits]\nmemory = \"32MiB\"\ntimeout = \"5m\"\n",
    );
    let host = host_with(dir.path(), &[("trap", fixture)]).await;
    assert_eq!(host.get("/fn/trap/").await.status, StatusCode::OK);
    let before = rss_bytes();
    for _ in 0..3 {
        let reply = host.get("/fn/trap/alloc").await;
        reply.assert_error(StatusCode::INTERNAL_SERVER_ERROR, "trap");
    }
    let after = rss_bytes();
    // Each bomb filled 32 MiB; three of them kept would be 96 MiB.
    assert!(
        after < before + (24 << 20),
        "{fixture}: RSS grew from {before} to {after}"
    );
    assert_eq!(host.get("/fn/trap/").await.text(), "ok\n");
    host.stop().await;
}
