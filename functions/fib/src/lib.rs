//! CPU-heavy on purpose: the naive recursive Fibonacci of `?n=` (default 25).
//! Benchmarks use it for compute, tests for deadlines (`n=45` runs for minutes).
use lichen_sdk::{Error, Request, Response, Result};

mod compute;
use compute::fib;

fn handle(req: Request) -> Result<Response> {
    let n: u32 = match req.query_param("n") {
        Some(raw) => raw
            .parse()
            .map_err(|_| Error::new(400, format!("n must be a whole number, got {raw:?}")))?,
        None => 25,
    };
    if n > 90 {
        return Err(Error::new(400, "n must be at most 90"));
    }
    Response::json(&serde_json::json!({ "n": n, "fib": fib(n) }))
}

lichen_sdk::export!(handle);
