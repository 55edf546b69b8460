//! The smallest Lichen function: a greeting in plain text.
use lichen_sdk::{Request, Response, Result};

fn handle(_req: Request) -> Result<Response> {
    Ok(Response::text("Hello from Lichen!\n"))
}

lichen_sdk::export!(handle);
