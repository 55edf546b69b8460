//! Sends the request back as JSON: method, path, query, the authority
//! (`Host`), headers and body.
//! Useful to see exactly what a function receives.
use lichen_sdk::{Request, Response, Result};

fn handle(req: Request) -> Result<Response> {
    let headers: Vec<(String, String)> = req
        .headers()
        .map(|(name, value)| {
            (
                name.to_string(),
                String::from_utf8_lossy(value).into_owned(),
            )
        })
        .collect();
    Response::json(&serde_json::json!({
        "method": req.method(),
        "uri": req.uri(),
        "authority": req.authority(),
        "path": req.path(),
        "query": req.query(),
        "headers": headers,
        "body": String::from_utf8_lossy(req.body()),
        "body_len": req.body().len(),
    }))
}

lichen_sdk::export!(handle);
