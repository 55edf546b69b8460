//! Squares a JSON number, or each number of a JSON array.
use lichen_sdk::{Error, Request, Response, Result};
use serde_json::Value;

fn square(value: &Value) -> Result<Value> {
    match value {
        Value::Number(n) if n.is_i64() || n.is_u64() => {
            let n = n.as_i64().ok_or_else(|| Error::new(400, "number out of range"))?;
            let squared = n
                .checked_mul(n)
                .ok_or_else(|| Error::new(400, format!("{n} squared overflows a 64-bit integer")))?;
            Ok(Value::from(squared))
        }
        Value::Number(n) => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            Ok(Value::from(f * f))
        }
        other => Err(Error::new(400, format!("expected a number, got {other}"))),
    }
}

fn handle(req: Request) -> Result<Response> {
    let input: Value = req.json()?;
    let output = match &input {
        Value::Array(items) => Value::Array(items.iter().map(square).collect::<Result<_>>()?),
        other => square(other)?,
    };
    Response::json(&output)
}

lichen_sdk::export!(handle);
