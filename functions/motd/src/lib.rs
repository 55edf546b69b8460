//! A message of the day behind an API key: the message is a setting and
//! the key a secret, both from the policy's `[config]` (see
//! `policies/motd.toml`), read with `lichen_sdk::config`. A request without
//! the key in `x-api-key` gets `401`; the key itself is never answered.
use lichen_sdk::{Error, Request, Response, Result, config};

fn handle(req: Request) -> Result<Response> {
    let expected = config::require("api_key")?;
    let given = req.header("x-api-key").unwrap_or_default();
    if !same(given.as_bytes(), expected.as_bytes()) {
        return Err(Error::new(401, "send the API key in x-api-key"));
    }
    let message = config::get("message")?.unwrap_or_else(|| "Hello.".to_string());
    Response::json(&serde_json::json!({ "message": message }))
}

/// Compares without stopping at the first difference, so the time taken
/// does not say how much of a guess was right.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0, |diff, (x, y)| diff | (x ^ y)) == 0
}

lichen_sdk::export!(handle);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_opens_the_message() {
        config::set_for_test("api_key", "k3y");
        config::set_for_test("message", "Lichen grows on bare rock.");
        let denied = handle(Request::builder().build()).unwrap_err();
        assert_eq!(denied.status(), 401);
        let wrong = Request::builder().header("x-api-key", "k3z").build();
        assert_eq!(handle(wrong).unwrap_err().status(), 401);
        let right = Request::builder().header("x-api-key", "k3y").build();
        let body = handle(right).unwrap();
        assert_eq!(body.body(), br#"{"message":"Lichen grows on bare rock."}"#);
    }
}
