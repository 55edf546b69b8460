//! CPU-heavy and loop-bound: the SHA-256 of the request body, in plain Rust,
//! answered as hex. `?mib=N` hashes N MiB made up in the guest instead (the
//! compute benchmark's loop-bound workload, beside fib's call-bound one).
use lichen_sdk::{Error, Request, Response, Result};

mod compute;
use compute::{hash_chain, sha256};

fn handle(req: Request) -> Result<Response> {
    let digest = match req.query_param("mib") {
        Some(raw) => {
            let mib: u32 = raw
                .parse()
                .map_err(|_| Error::new(400, format!("mib must be a whole number, got {raw:?}")))?;
            if mib > 4096 {
                return Err(Error::new(400, "mib must be at most 4096"));
            }
            hash_chain(mib)
        }
        None => sha256(req.body()),
    };
    let hex: String = digest.iter().map(|byte| format!("{byte:02x}")).collect();
    Ok(Response::text(hex + "\n"))
}

lichen_sdk::export!(handle);
