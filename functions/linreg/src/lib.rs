//! Least-squares linear regression on a shard of data kept in the
//! function's `shards` key-value store: the data is loaded once and stays in
//! the store; what comes back from a step is the shard's gradient, never its
//! rows. `lichen train` drives it (see the README's "Edge computing, end to
//! end").
//!
//! - `POST /load` with `{"shard": "s3", "rows": [[x1, ..., xd, y], ...]}`
//!   stores the shard (replacing one of the same id) and answers
//!   `{"shard", "rows", "features"}`.
//! - `POST /grad` with `{"theta": [b, w1, ..., wd], "shard": "s3"}` answers
//!   `{"shard", "grad", "loss", "n"}` for that shard: with the prediction
//!   `b + w·x` and the residual `r` of each row, `loss = Σr² / 2n` and
//!   `grad = (Σr, Σr·x1, ..., Σr·xd) / n`, the gradient of `loss`.
//! - `GET /` lists the shards stored.
//!
//! Bad input (a shard never loaded, a theta of the wrong length, a row that
//! is not all numbers) is a `400` saying which.
use lichen_sdk::kv::Store;
use lichen_sdk::{Error, Request, Response, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

const STORE: &str = "shards";
/// Longest shard id: a key in the store.
const MAX_SHARD_ID: usize = 64;

/// A shard as stored: rows of features then the target.
#[derive(Serialize, Deserialize)]
struct Shard {
    features: usize,
    rows: Vec<Vec<f64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Load {
    shard: String,
    rows: Vec<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Grad {
    shard: String,
    theta: Vec<Value>,
}

fn shard_id(id: &str) -> Result<&str> {
    let valid = !id.is_empty()
        && id.len() <= MAX_SHARD_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if valid {
        Ok(id)
    } else {
        Err(Error::new(
            400,
            format!("shard id {id:?}: 1 to {MAX_SHARD_ID} letters, digits, '-', '_' or '.'"),
        ))
    }
}

/// A JSON array of finite numbers, or a 400 naming what it is.
fn numbers(value: &Value, what: &str) -> Result<Vec<f64>> {
    let Value::Array(items) = value else {
        return Err(Error::new(400, format!("{what} is not an array of numbers: {value}")));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| match item.as_f64() {
            Some(x) if x.is_finite() => Ok(x),
            _ => Err(Error::new(400, format!("{what}[{i}] is not a number: {item}"))),
        })
        .collect()
}

fn load(req: &Request) -> Result<Response> {
    let load: Load = req.json()?;
    let id = shard_id(&load.shard)?;
    if load.rows.is_empty() {
        return Err(Error::new(400, "a shard needs at least one row"));
    }
    let mut rows = Vec::with_capacity(load.rows.len());
    for (i, row) in load.rows.iter().enumerate() {
        let row = numbers(row, &format!("row {i}"))?;
        rows.push(row);
    }
    let columns = rows[0].len();
    if columns < 2 {
        return Err(Error::new(400, "a row is at least one feature and the target"));
    }
    if let Some(i) = rows.iter().position(|r| r.len() != columns) {
        return Err(Error::new(
            400,
            format!("row {i} has {} values; row 0 has {columns}", rows[i].len()),
        ));
    }
    let shard = Shard { features: columns - 1, rows };
    Store::open(STORE)?.set_json(id, &shard)?;
    Response::json(&json!({ "shard": id, "rows": shard.rows.len(), "features": shard.features }))
}

/// The shard's loss and its gradient at `theta` (bias first).
fn gradient(shard: &Shard, theta: &[f64]) -> (Vec<f64>, f64) {
    let mut grad = vec![0.0; theta.len()];
    let mut loss = 0.0;
    for row in &shard.rows {
        let (x, y) = row.split_at(shard.features);
        let prediction = theta[0] + theta[1..].iter().zip(x).map(|(w, x)| w * x).sum::<f64>();
        let residual = prediction - y[0];
        loss += residual * residual;
        grad[0] += residual;
        for (g, x) in grad[1..].iter_mut().zip(x) {
            *g += residual * x;
        }
    }
    let n = shard.rows.len() as f64;
    for g in &mut grad {
        *g /= n;
    }
    (grad, loss / (2.0 * n))
}

fn grad(req: &Request) -> Result<Response> {
    let grad: Grad = req.json()?;
    let id = shard_id(&grad.shard)?;
    let theta = numbers(&Value::Array(grad.theta), "theta")?;
    let shard: Shard = Store::open(STORE)?
        .get_json(id)?
        .ok_or_else(|| Error::new(400, format!("no shard {id:?} is loaded; POST /load it first")))?;
    if theta.len() != shard.features + 1 {
        return Err(Error::new(
            400,
            format!(
                "theta has {} values; shard {id:?} has {} features, so theta is the bias and {} weights",
                theta.len(),
                shard.features,
                shard.features
            ),
        ));
    }
    let (grad, loss) = gradient(&shard, &theta);
    Response::json(&json!({ "shard": id, "grad": grad, "loss": loss, "n": shard.rows.len() }))
}

fn handle(req: Request) -> Result<Response> {
    match (req.method(), req.path()) {
        ("POST", "/load") => load(&req),
        ("POST", "/grad") => grad(&req),
        ("GET", "/") => Response::json(&json!({ "shards": Store::open(STORE)?.keys()? })),
        (method, path) => Err(Error::new(
            404,
            format!("no {method} {path}: POST /load, POST /grad or GET /"),
        )),
    }
}

lichen_sdk::export!(handle);

#[cfg(test)]
mod tests {
    use super::*;

    fn post(path: &str, body: Value) -> Result<Value> {
        let request = Request::builder().method("POST").uri(path).body(body.to_string()).build();
        let response = handle(request)?;
        Ok(serde_json::from_slice(response.body()).expect("JSON"))
    }

    fn status(result: Result<Value>) -> Option<u16> {
        result.err().map(|e| e.status())
    }

    #[test]
    fn the_gradient_of_a_known_shard() {
        // y = 1 + 2x exactly: zero loss and gradient at the truth.
        post("/load", json!({ "shard": "a", "rows": [[0.0, 1.0], [1.0, 3.0], [2.0, 5.0]] }))
            .expect("load");
        let at_truth = post("/grad", json!({ "shard": "a", "theta": [1.0, 2.0] })).expect("grad");
        assert_eq!(at_truth["loss"], 0.0);
        assert_eq!(at_truth["grad"], json!([0.0, 0.0]));
        assert_eq!(at_truth["n"], 3);
        // At theta = 0 the residuals are -1, -3, -5: loss 35/6, grad
        // (-9/3, (0 - 3 - 10)/3).
        let at_zero = post("/grad", json!({ "shard": "a", "theta": [0, 0] })).expect("grad");
        assert!((at_zero["loss"].as_f64().unwrap() - 35.0 / 6.0).abs() < 1e-12);
        assert_eq!(at_zero["grad"], json!([-3.0, -13.0 / 3.0]));
    }

    #[test]
    fn bad_input_is_a_400_saying_what() {
        post("/load", json!({ "shard": "b", "rows": [[1, 2, 3]] })).expect("load");
        for body in [
            json!({ "shard": "missing", "theta": [0, 0, 0] }),
            json!({ "shard": "b", "theta": [0, 0] }),
            json!({ "shard": "b", "theta": [0, "x", 0] }),
            json!({ "shard": "../b", "theta": [0, 0, 0] }),
            json!({ "theta": [0, 0, 0] }),
        ] {
            assert_eq!(status(post("/grad", body.clone())), Some(400), "{body}");
        }
        for body in [
            json!({ "shard": "c", "rows": [[1, 2], [1, "two"]] }),
            json!({ "shard": "c", "rows": [[1, 2], [1]] }),
            json!({ "shard": "c", "rows": [] }),
            json!({ "shard": "c", "rows": [[1]] }),
            json!({ "shard": "c", "rows": "no" }),
        ] {
            assert_eq!(status(post("/load", body.clone())), Some(400), "{body}");
        }
        assert_eq!(status(post("/nothing", json!({}))), Some(404));
    }
}
