//! Key-value state for functions: the stores behind `wasi:keyvalue`.
//!
//! A function sees only the stores its policy grants (`[keyvalue] stores`),
//! by label; its data is kept under (function, label), so two functions
//! that both open `default` never see each other's keys. One trait,
//! [`Backend`], is what a store must do; [`Kv`] is the host's choice of
//! backend, made once at start (`--kv-backend`):
//! - [`local`]: redb, one file in the data directory, on every host. The
//!   default: nothing to run beside the host, and an acknowledged write
//!   survives a crash (it is acknowledged after its commit's fsync).
//!
//! Limits per store (`max_keys`, `max_bytes`) are checked by the backend in
//! the same transaction as the write they bound, so concurrent writers
//! cannot overshoot them together; a write that would grow a store past a
//! limit is refused and nothing stored is touched (lowering a limit below
//! what is stored refuses growth, it deletes nothing). The per-call and
//! per-invocation limits (key and value sizes, operations) are checked in
//! [`wasi`], before a backend is asked.
//!
//! Counters (`increment`) are stored as decimal text, as wasmtime's own
//! `wasi:keyvalue` does, so a `get` of a counter reads as its number.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};
use serde::Serialize;

pub mod conformance;
pub mod local;
pub mod nats;
pub mod wasi;

pub use local::LocalBackend;
pub use nats::NatsBackend;

/// One store of one function: where its keys live.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Scope {
    pub function: Arc<str>,
    pub label: Arc<str>,
}

impl Scope {
    pub fn new(function: &str, label: &str) -> Self {
        Scope {
            function: Arc::from(function),
            label: Arc::from(label),
        }
    }
}

/// How large one store may grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub max_keys: u64,
    /// Keys and values together.
    pub max_bytes: u64,
}

impl Quota {
    /// No limit: for writes that cannot grow a store.
    pub const UNLIMITED: Quota = Quota {
        max_keys: u64::MAX,
        max_bytes: u64::MAX,
    };
}

/// What one store holds: keys, and bytes of keys and values together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub keys: u64,
    pub bytes: u64,
}

impl Usage {
    /// What a write leaves, given the size of the entry it replaces
    /// (`None`: a new key) and the size of the new one.
    fn after_write(self, old: Option<u64>, new: u64) -> Usage {
        match old {
            Some(old) => Usage {
                keys: self.keys,
                bytes: self.bytes.saturating_sub(old).saturating_add(new),
            },
            None => Usage {
                keys: self.keys.saturating_add(1),
                bytes: self.bytes.saturating_add(new),
            },
        }
    }

    fn after_delete(self, old: u64) -> Usage {
        Usage {
            keys: self.keys.saturating_sub(1),
            bytes: self.bytes.saturating_sub(old),
        }
    }

    /// Refuses a write that grows the store past its quota. A write that
    /// does not grow it (a store already over a lowered limit) is let
    /// through: limits refuse growth, they never force data out.
    fn check(self, next: Usage, quota: Quota) -> Result<(), KvError> {
        if next.keys > self.keys && next.keys > quota.max_keys {
            return Err(KvError::Limit(format!(
                "max_keys: the store holds {} keys, the policy's limit",
                self.keys
            )));
        }
        if next.bytes > self.bytes && next.bytes > quota.max_bytes {
            return Err(KvError::Limit(format!(
                "max_bytes: the write would make the store {} bytes, over the policy's limit of {}",
                next.bytes, quota.max_bytes
            )));
        }
        Ok(())
    }
}

/// The size an entry counts for: its key and its value.
fn entry_size(key: &str, value: &[u8]) -> u64 {
    (key.len() + value.len()) as u64
}

/// One page of a store's keys, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub keys: Vec<String>,
    /// Where the next page starts (the last key of this one), if any.
    pub next: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    /// A policy limit; the message names it.
    #[error("{0}")]
    Limit(String),
    /// The backend cannot be reached or failed; the guest may retry.
    #[error("key-value store unavailable: {0}")]
    Unavailable(String),
    /// The operation does not apply to what is stored (a counter that is
    /// not a number, an overflow).
    #[error("{0}")]
    Invalid(String),
}

impl KvError {
    /// What went wrong, without the kind's prefix.
    pub fn detail(&self) -> &str {
        match self {
            KvError::Limit(detail) | KvError::Unavailable(detail) | KvError::Invalid(detail) => {
                detail
            }
        }
    }
}

/// What a key-value store must do. Every method acts on one function's
/// store; a write is acknowledged only once it is durable by the backend's
/// own standard, and a read sees every write acknowledged before it.
pub trait Backend: Send + Sync + 'static {
    fn get(
        &self,
        scope: &Scope,
        key: &str,
    ) -> impl Future<Output = Result<Option<Vec<u8>>, KvError>> + Send;

    fn set(
        &self,
        scope: &Scope,
        key: &str,
        value: Vec<u8>,
        quota: Quota,
    ) -> impl Future<Output = Result<(), KvError>> + Send;

    /// Deleting a key that is not there is not an error.
    fn delete(&self, scope: &Scope, key: &str) -> impl Future<Output = Result<(), KvError>> + Send;

    fn exists(
        &self,
        scope: &Scope,
        key: &str,
    ) -> impl Future<Output = Result<bool, KvError>> + Send;

    /// Up to `limit` keys in order, starting after `after`.
    fn list(
        &self,
        scope: &Scope,
        after: Option<&str>,
        limit: usize,
    ) -> impl Future<Output = Result<Page, KvError>> + Send;

    /// Adds `delta` to the counter at `key` (absent: 0) and returns the sum.
    fn increment(
        &self,
        scope: &Scope,
        key: &str,
        delta: i64,
        quota: Quota,
    ) -> impl Future<Output = Result<i64, KvError>> + Send;

    /// Writes `value` if what is stored is `expected` (`None`: absent);
    /// returns whether it did.
    fn compare_and_swap(
        &self,
        scope: &Scope,
        key: &str,
        expected: Option<Vec<u8>>,
        value: Vec<u8>,
        quota: Quota,
    ) -> impl Future<Output = Result<bool, KvError>> + Send;

    fn usage(&self, scope: &Scope) -> impl Future<Output = Result<Usage, KvError>> + Send;

    /// The labels of the stores `function` has data in, with their usage.
    fn stores(
        &self,
        function: &str,
    ) -> impl Future<Output = Result<Vec<(String, Usage)>, KvError>> + Send;

    /// Every store with data: (function, label, usage).
    fn all_stores(
        &self,
    ) -> impl Future<Output = Result<Vec<(String, String, Usage)>, KvError>> + Send;

    /// Deletes everything in one store.
    fn purge(&self, scope: &Scope) -> impl Future<Output = Result<(), KvError>> + Send;
}

/// The host's key-value backend.
pub enum Kv {
    Local(LocalBackend),
    Nats(Box<NatsBackend>),
}

impl Kv {
    /// The JetStream context and replica count of the NATS backend, for
    /// the cluster's registry when it lives there too.
    pub fn nats_context(&self) -> Option<(async_nats::jetstream::Context, usize)> {
        match self {
            Kv::Local(_) => None,
            Kv::Nats(nats) => Some(nats.jetstream()),
        }
    }

    /// How the cluster sees this backend: hosts that say the same see the
    /// same data (`local:<node>` is this host's alone).
    pub fn kind(&self) -> &'static str {
        match self {
            Kv::Local(_) => "local",
            Kv::Nats(_) => "nats",
        }
    }

    /// Which data this host sees, for the cluster: hosts that say the same
    /// see the same stores. The embedded store is this host's alone; a
    /// NATS host not yet connected says so with its own name, so nothing
    /// is sent its way on a guess.
    pub fn identity(&self, node: &str) -> String {
        match self {
            Kv::Local(_) => format!("local:{node}"),
            Kv::Nats(nats) => match nats.identity() {
                Some(cluster) => format!("nats:{cluster}"),
                None => format!("nats-unconnected:{node}"),
            },
        }
    }

    /// Whether the backend can be reached now (`/readyz`).
    pub fn reachable(&self) -> bool {
        match self {
            Kv::Local(_) => true,
            Kv::Nats(nats) => nats.connected(),
        }
    }

    /// Finishes what is queued and lets go of the backend (at shutdown).
    pub async fn close(&self) {
        match self {
            Kv::Local(local) => local.close().await,
            Kv::Nats(nats) => nats.close().await,
        }
    }
}

/// `Kv` is a backend by passing each call to the one it holds.
macro_rules! delegate {
    ($self:ident, $backend:ident => $call:expr) => {
        match $self {
            Kv::Local($backend) => $call.await,
            Kv::Nats($backend) => $call.await,
        }
    };
}

impl Backend for Kv {
    async fn get(&self, scope: &Scope, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        delegate!(self, b => b.get(scope, key))
    }

    async fn set(
        &self,
        scope: &Scope,
        key: &str,
        value: Vec<u8>,
        quota: Quota,
    ) -> Result<(), KvError> {
        delegate!(self, b => b.set(scope, key, value, quota))
    }

    async fn delete(&self, scope: &Scope, key: &str) -> Result<(), KvError> {
        delegate!(self, b => b.delete(scope, key))
    }

    async fn exists(&self, scope: &Scope, key: &str) -> Result<bool, KvError> {
        delegate!(self, b => b.exists(scope, key))
    }

    async fn list(
        &self,
        scope: &Scope,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page, KvError> {
        delegate!(self, b => b.list(scope, after, limit))
    }

    async fn increment(
        &self,
        scope: &Scope,
        key: &str,
        delta: i64,
        quota: Quota,
    ) -> Result<i64, KvError> {
        delegate!(self, b => b.increment(scope, key, delta, quota))
    }

    async fn compare_and_swap(
        &self,
        scope: &Scope,
        key: &str,
        expected: Option<Vec<u8>>,
        value: Vec<u8>,
        quota: Quota,
    ) -> Result<bool, KvError> {
        delegate!(self, b => b.compare_and_swap(scope, key, expected, value, quota))
    }

    async fn usage(&self, scope: &Scope) -> Result<Usage, KvError> {
        delegate!(self, b => b.usage(scope))
    }

    async fn stores(&self, function: &str) -> Result<Vec<(String, Usage)>, KvError> {
        delegate!(self, b => b.stores(function))
    }

    async fn all_stores(&self) -> Result<Vec<(String, String, Usage)>, KvError> {
        delegate!(self, b => b.all_stores())
    }

    async fn purge(&self, scope: &Scope) -> Result<(), KvError> {
        delegate!(self, b => b.purge(scope))
    }
}

/// What an invocation is handed: the host's backend, and where its
/// operations are counted.
#[derive(Clone)]
pub struct KvAccess {
    pub backend: Arc<Kv>,
    pub metrics: KvMetrics,
}

/// The `op` label values of the key-value metrics.
pub const OPS: &[&str] = &[
    "open",
    "get",
    "set",
    "delete",
    "exists",
    "list",
    "increment",
    "cas",
    "get_many",
    "set_many",
    "delete_many",
];
/// The `outcome` label values: `limit` is a policy limit (also counted in
/// `lichen_kv_quota_rejections_total`), `unavailable` the backend failing.
pub const OUTCOMES: &[&str] = &["ok", "denied", "limit", "unavailable", "invalid"];

/// The key-value series of the host's registry.
#[derive(Clone)]
pub struct KvMetrics {
    pub operations: IntCounterVec,
    pub duration: HistogramVec,
    pub quota_rejections: IntCounterVec,
    /// Per store, set when scraped.
    pub bytes: IntGaugeVec,
    pub keys: IntGaugeVec,
}

impl KvMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let metrics = KvMetrics {
            operations: IntCounterVec::new(
                Opts::new(
                    "lichen_kv_operations_total",
                    "Key-value operations by function, operation and outcome (ok, denied, limit, unavailable, invalid).",
                ),
                &["function", "op", "outcome"],
            )?,
            duration: HistogramVec::new(
                HistogramOpts::new(
                    "lichen_kv_operation_duration_seconds",
                    "Time a key-value operation took, by operation.",
                )
                .buckets(vec![
                    0.00001, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                    0.05, 0.1, 0.25, 1.0,
                ]),
                &["op"],
            )?,
            quota_rejections: IntCounterVec::new(
                Opts::new(
                    "lichen_kv_quota_rejections_total",
                    "Key-value operations refused by a policy limit, per function.",
                ),
                &["function"],
            )?,
            bytes: IntGaugeVec::new(
                Opts::new(
                    "lichen_kv_bytes",
                    "Bytes of keys and values in a function's store.",
                ),
                &["function", "store"],
            )?,
            keys: IntGaugeVec::new(
                Opts::new("lichen_kv_keys", "Keys in a function's store."),
                &["function", "store"],
            )?,
        };
        registry.register(Box::new(metrics.operations.clone()))?;
        registry.register(Box::new(metrics.duration.clone()))?;
        registry.register(Box::new(metrics.quota_rejections.clone()))?;
        registry.register(Box::new(metrics.bytes.clone()))?;
        registry.register(Box::new(metrics.keys.clone()))?;
        Ok(metrics)
    }

    pub fn record(&self, function: &str, op: &str, outcome: &str, took: Duration) {
        self.operations
            .with_label_values(&[function, op, outcome])
            .inc();
        self.duration
            .with_label_values(&[op])
            .observe(took.as_secs_f64());
        if outcome == "limit" {
            self.quota_rejections.with_label_values(&[function]).inc();
        }
    }

    /// Drops every per-function series of a deleted function.
    pub fn forget_function(&self, function: &str) {
        for op in OPS {
            for outcome in OUTCOMES {
                let _ = self
                    .operations
                    .remove_label_values(&[function, op, outcome]);
            }
        }
        let _ = self.quota_rejections.remove_label_values(&[function]);
    }

    /// Sets the per-store gauges to `stores` (function, label, usage),
    /// dropping series of stores no longer listed.
    pub fn set_usage(&self, stores: &[(String, String, Usage)]) {
        self.bytes.reset();
        self.keys.reset();
        for (function, label, usage) in stores {
            let labels = [function.as_str(), label.as_str()];
            self.bytes
                .with_label_values(&labels)
                .set(i64::try_from(usage.bytes).unwrap_or(i64::MAX));
            self.keys
                .with_label_values(&labels)
                .set(i64::try_from(usage.keys).unwrap_or(i64::MAX));
        }
    }
}

/// A counter's value as stored: decimal text (absent: 0).
fn parse_counter(key: &str, stored: Option<&[u8]>) -> Result<i64, KvError> {
    let Some(bytes) = stored else {
        return Ok(0);
    };
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|text| text.trim().parse::<i64>().ok())
        .ok_or_else(|| KvError::Invalid(format!("the value of {key:?} is not a number")))
}

/// The counter after adding `delta`.
fn add_to_counter(key: &str, stored: Option<&[u8]>, delta: i64) -> Result<i64, KvError> {
    parse_counter(key, stored)?
        .checked_add(delta)
        .ok_or_else(|| KvError::Invalid(format!("incrementing {key:?} by {delta} overflows")))
}
