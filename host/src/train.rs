//! `lichen train`: data-parallel gradient descent over a host and its
//! peers, with the data kept where it was loaded. The driver of the
//! `functions/linreg` example:
//!
//! 1. makes a synthetic data set, `y = b + w·x + noise`, from a seed (the
//!    same seed, the same data and the same run), cut into shards;
//! 2. loads each shard into the function's key-value store with one map
//!    over `POST /load` (the rows travel once, here);
//! 3. runs gradient descent: each step is one map over `POST /grad`, an
//!    item per shard carrying only theta; each answers its shard's gradient,
//!    loss and row count, which are averaged weighted by rows, and theta
//!    moves against the gradient: `theta <- theta - alpha * grad J(theta)`.
//!
//! Items a dead or busy host could not answer (`5xx`) are sent again in
//! another map, and a map the host could not finish is tried again:
//! computing a shard's gradient twice is harmless, so a peer that dies
//! mid-step, or the host itself restarting, costs a retry, not the run.
//! Pauses between attempts double from half a second (15.5 s in all). A
//! `4xx` item (bad input) ends the run with its message.
//!
//! A CLI command rather than a script: it reuses the CLI's URL, token and
//! TLS handling, and its arithmetic (the data, the averaging) is Rust's, so
//! a run is bit-for-bit repeatable and testable beside the host.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use http::{Method, StatusCode};
use serde::Serialize;
use serde_json::{Value, json};

use crate::client::Target;

/// How many times a map, or an item in it, is tried.
const ATTEMPTS: usize = 6;
/// Pause before the second attempt, doubled before each one after (0.5 s
/// up to 8 s, 15.5 s in all): long enough for the failure detector to
/// notice a dead peer (a second or two) or for a host to restart.
const FIRST_PAUSE: Duration = Duration::from_millis(500);
/// Longest a map may take before it counts as failed and is tried again.
const MAP_TIMEOUT: Duration = Duration::from_secs(60);

/// What to train and how (the flags of `lichen train`).
#[derive(Debug, Clone, Serialize, clap::Args)]
pub struct Settings {
    /// The deployed linreg function.
    #[arg(long, default_value = "linreg")]
    pub function: String,
    #[arg(long, default_value_t = 8)]
    pub shards: usize,
    /// Rows per shard.
    #[arg(long, default_value_t = 1000)]
    pub rows: usize,
    /// Features per row (theta is the bias and one weight each).
    #[arg(long, default_value_t = 3)]
    pub features: usize,
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// The learning rate.
    #[arg(long, default_value_t = 0.5)]
    pub alpha: f64,
    /// Makes the data (and so the run): the same seed, the same result.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Standard deviation of the noise on each target.
    #[arg(long, default_value_t = 0.1)]
    pub noise: f64,
    /// Train on the shards a run with the same seed and sizes already
    /// loaded instead of loading them again.
    #[arg(long = "no-load", action = clap::ArgAction::SetFalse)]
    pub load: bool,
}

/// The flags' defaults: `lichen train` with no flags.
impl Default for Settings {
    fn default() -> Self {
        use clap::{Args, FromArgMatches};
        let flags = Settings::augment_args(clap::Command::new("train"));
        flags
            .try_get_matches_from(["train"])
            .and_then(|matches| Settings::from_arg_matches(&matches))
            .expect("every flag of lichen train has a default")
    }
}

/// One step of gradient descent.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub step: usize,
    /// The loss at the theta the step started from (mean over all rows of
    /// half the squared residual).
    pub loss: f64,
    /// Theta after the step.
    pub theta: Vec<f64>,
    /// Items of this step's maps, by the host that answered them.
    pub served_by: BTreeMap<String, usize>,
    /// Items sent again because a host failed them.
    pub retried: usize,
    /// Bytes of the step's map requests and answers (theta out, gradients
    /// back).
    pub bytes: usize,
}

/// A whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub settings: Settings,
    pub true_theta: Vec<f64>,
    pub theta: Vec<f64>,
    /// The loss at the final theta.
    pub final_loss: f64,
    /// Euclidean distance from the final theta to the true one.
    pub distance: f64,
    /// Bytes of the load's map requests and answers (the rows, once; 0
    /// without a load).
    pub loaded_bytes: usize,
    pub steps: Vec<Step>,
}

/// SplitMix64: a small, fixed generator, so a seed means the same data on
/// every machine and every version.
struct Random(u64);

impl Random {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [lo, hi).
    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }

    /// Standard normal (Box-Muller).
    fn normal(&mut self) -> f64 {
        let u = 1.0 - self.unit();
        let v = self.unit();
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

/// The true theta (bias first) and the shards' rows (features, then y).
pub fn data(settings: &Settings) -> (Vec<f64>, Vec<Vec<Vec<f64>>>) {
    let mut random = Random(settings.seed);
    let theta: Vec<f64> = (0..=settings.features)
        .map(|_| random.uniform(-2.0, 2.0))
        .collect();
    let shards = (0..settings.shards)
        .map(|_| {
            (0..settings.rows)
                .map(|_| {
                    let mut row: Vec<f64> = (0..settings.features)
                        .map(|_| random.uniform(-1.0, 1.0))
                        .collect();
                    let y = theta[0]
                        + theta[1..].iter().zip(&row).map(|(w, x)| w * x).sum::<f64>()
                        + settings.noise * random.normal();
                    row.push(y);
                    row
                })
                .collect()
        })
        .collect();
    (theta, shards)
}

fn shard_id(i: usize) -> String {
    format!("s{i}")
}

/// Runs `settings` against the host at `target`; `on_step` sees each step
/// as it ends.
pub async fn train(
    target: &Target,
    settings: &Settings,
    mut on_step: impl FnMut(&Step),
) -> Result<Outcome> {
    check(settings)?;
    let (true_theta, shards) = data(settings);
    let mut loaded_bytes = 0;
    if settings.load {
        let items: Vec<Value> = shards
            .iter()
            .enumerate()
            .map(|(i, rows)| json!({ "shard": shard_id(i), "rows": rows }))
            .collect();
        loaded_bytes = map_all(target, &settings.function, "/load", items)
            .await?
            .bytes;
    }
    let mut theta = vec![0.0; settings.features + 1];
    let mut steps = Vec::with_capacity(settings.steps);
    for step in 1..=settings.steps {
        let (grad, mut done) = gradient(target, settings, &theta).await?;
        for (t, g) in theta.iter_mut().zip(&grad) {
            *t -= settings.alpha * g;
        }
        done.step = step;
        done.theta = theta.clone();
        on_step(&done);
        steps.push(done);
    }
    let (_, last) = gradient(target, settings, &theta).await?;
    let distance = theta
        .iter()
        .zip(&true_theta)
        .map(|(a, b)| (a - b) * (a - b))
        .sum::<f64>()
        .sqrt();
    Ok(Outcome {
        settings: settings.clone(),
        true_theta,
        theta,
        final_loss: last.loss,
        distance,
        loaded_bytes,
        steps,
    })
}

fn check(settings: &Settings) -> Result<()> {
    if settings.shards == 0 || settings.rows == 0 || settings.features == 0 {
        bail!("--shards, --rows and --features must each be at least 1");
    }
    if !(settings.alpha.is_finite() && settings.alpha > 0.0) {
        bail!("--alpha must be a positive number");
    }
    if !(settings.noise.is_finite() && settings.noise >= 0.0) {
        bail!("--noise must be zero or more");
    }
    Ok(())
}

/// The gradient over every shard at `theta`, and the step so far (its loss,
/// who served it).
async fn gradient(target: &Target, settings: &Settings, theta: &[f64]) -> Result<(Vec<f64>, Step)> {
    let items: Vec<Value> = (0..settings.shards)
        .map(|i| json!({ "shard": shard_id(i), "theta": theta }))
        .collect();
    let mapped = map_all(target, &settings.function, "/grad", items).await?;
    // Weighted by rows, summed in shard order: the same inputs give the
    // same bits.
    let mut grad = vec![0.0; theta.len()];
    let mut loss = 0.0;
    let mut rows = 0.0;
    for (i, body) in mapped.results.iter().enumerate() {
        let shard = shard_id(i);
        let n = body["n"]
            .as_u64()
            .with_context(|| format!("shard {shard}: no row count in {body}"))?
            as f64;
        let shard_loss = body["loss"]
            .as_f64()
            .with_context(|| format!("shard {shard}: no loss in {body}"))?;
        let shard_grad = body["grad"]
            .as_array()
            .filter(|g| g.len() == theta.len())
            .with_context(|| format!("shard {shard}: no gradient of {} in {body}", theta.len()))?;
        for (total, g) in grad.iter_mut().zip(shard_grad) {
            *total += n * g
                .as_f64()
                .with_context(|| format!("shard {shard}: {g} is not a number"))?;
        }
        loss += n * shard_loss;
        rows += n;
    }
    for g in &mut grad {
        *g /= rows;
    }
    let step = Step {
        step: 0,
        loss: loss / rows,
        theta: Vec::new(),
        served_by: mapped.served_by,
        retried: mapped.retried,
        bytes: mapped.bytes,
    };
    Ok((grad, step))
}

/// What a map of every item came to.
struct Mapped {
    /// Each item's `200` body, in order.
    results: Vec<Value>,
    served_by: BTreeMap<String, usize>,
    /// Items sent again.
    retried: usize,
    /// Bytes of the map requests and answers.
    bytes: usize,
}

/// Every item's `200` body, in order, sending again what failed with a
/// `5xx` (or a whole map the host could not answer); with who served the
/// items and how many were sent again.
async fn map_all(target: &Target, function: &str, path: &str, items: Vec<Value>) -> Result<Mapped> {
    let route = format!("/v1/functions/{function}/map?path={path}");
    let mut results: Vec<Option<Value>> = vec![None; items.len()];
    let mut served_by = BTreeMap::new();
    let mut retried = 0;
    let mut bytes = 0;
    let mut last_error = String::new();
    for attempt in 0..ATTEMPTS {
        let pending: Vec<usize> = (0..items.len()).filter(|i| results[*i].is_none()).collect();
        if pending.is_empty() {
            break;
        }
        if attempt > 0 {
            retried += pending.len();
            tokio::time::sleep(FIRST_PAUSE * (1 << (attempt - 1))).await;
        }
        let body: Vec<&Value> = pending.iter().map(|i| &items[*i]).collect();
        let body = serde_json::to_vec(&body)?;
        bytes += body.len();
        let answered = tokio::time::timeout(
            MAP_TIMEOUT,
            target.send(Method::POST, &route, body, "application/json"),
        )
        .await;
        let (status, answer) = match answered {
            Ok(Ok(answer)) => answer,
            Ok(Err(error)) => {
                last_error = format!("{error:#}");
                continue;
            }
            Err(_) => {
                last_error = format!("no answer within {MAP_TIMEOUT:?}");
                continue;
            }
        };
        bytes += answer.len();
        let answer: Value = serde_json::from_slice(&answer)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&answer).into_owned()));
        if status.is_server_error() {
            last_error = format!("{status}: {}", message(&answer));
            continue;
        }
        if status != StatusCode::OK {
            bail!("{function} map: {status}: {}", message(&answer));
        }
        let answers = answer
            .as_array()
            .filter(|a| a.len() == pending.len())
            .with_context(|| {
                format!(
                    "{function} map: not an array of {} results: {answer}",
                    pending.len()
                )
            })?;
        for (i, result) in pending.iter().zip(answers) {
            let status = result["status"].as_u64().unwrap_or(0);
            let item = &items[*i];
            match status {
                200 => {
                    if let Some(node) = result["served_by"].as_str() {
                        *served_by.entry(node.to_string()).or_insert(0) += 1;
                    }
                    results[*i] = Some(result["body"].clone());
                }
                500..=599 => {
                    last_error = format!(
                        "shard {}: {status}: {}",
                        item["shard"],
                        message(&result["body"])
                    );
                }
                _ => bail!(
                    "{function} {path} for shard {}: {status}: {}",
                    item["shard"],
                    message(&result["body"])
                ),
            }
        }
    }
    let failed = results.iter().filter(|r| r.is_none()).count();
    if failed > 0 {
        bail!(
            "{function} {path}: {failed} items still failing after {ATTEMPTS} attempts; last: {last_error}"
        );
    }
    Ok(Mapped {
        results: results.into_iter().flatten().collect(),
        served_by,
        retried,
        bytes,
    })
}

/// The `error` of a JSON error body, or the body.
fn message(body: &Value) -> String {
    body.get("error")
        .and_then(Value::as_str)
        .map_or_else(|| body.to_string(), str::to_string)
}

/// The run as a person reads it: a line per step, then the result.
pub fn step_line(step: &Step) -> String {
    let theta: Vec<String> = step.theta.iter().map(|t| format!("{t:+.4}")).collect();
    let served: Vec<String> = step
        .served_by
        .iter()
        .map(|(node, n)| format!("{node}:{n}"))
        .collect();
    let mut line = format!(
        "step {:>3}  loss {:.6}  theta [{}]",
        step.step,
        step.loss,
        theta.join(", ")
    );
    if !served.is_empty() {
        line.push_str(&format!("  served by {}", served.join(" ")));
    }
    if step.retried > 0 {
        line.push_str(&format!("  ({} items retried)", step.retried));
    }
    line
}

pub fn summary(outcome: &Outcome) -> String {
    let show = |v: &[f64]| {
        v.iter()
            .map(|t| format!("{t:+.4}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let rows = outcome.settings.shards * outcome.settings.rows;
    let per_step =
        outcome.steps.iter().map(|s| s.bytes).sum::<usize>() / outcome.steps.len().max(1);
    format!(
        "final loss {:.6} over {rows} rows in {} shards\ntheta      [{}]\ntrue theta [{}]\ndistance to the true theta: {:.6}\nto and from the host: {} bytes of rows, once; then {per_step} bytes a step (theta out, gradients back)",
        outcome.final_loss,
        outcome.settings.shards,
        show(&outcome.theta),
        show(&outcome.true_theta),
        outcome.distance,
        outcome.loaded_bytes,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_makes_the_same_data_and_another_seed_other_data() {
        let settings = Settings {
            shards: 2,
            rows: 3,
            ..Settings::default()
        };
        let (theta, shards) = data(&settings);
        assert_eq!(theta.len(), 4);
        assert_eq!(shards.len(), 2);
        assert!(shards.iter().flatten().all(|row| row.len() == 4));
        assert_eq!(data(&settings), (theta.clone(), shards));
        let other = Settings {
            seed: 2,
            ..settings
        };
        assert_ne!(data(&other).0, theta);
    }

    #[test]
    fn the_noise_is_roughly_standard_normal() {
        let mut random = Random(7);
        let n = 100_000;
        let samples: Vec<f64> = (0..n).map(|_| random.normal()).collect();
        let mean = samples.iter().sum::<f64>() / n as f64;
        let variance = samples.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.02, "{mean}");
        assert!((variance - 1.0).abs() < 0.02, "{variance}");
    }
}
