//! What every request handler of one host shares: the function table, the
//! cluster once joined, the admin token, the limits of the HTTP surface, and
//! the request id counter.
//!
//! It is built once by `server` and handed to each connection behind an
//! `Arc`. The function table is an `Arc` of its own because the cluster's
//! sync loop holds it too, without holding the API.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::cluster::Cluster;
use crate::functions::Functions;
use crate::oci::Registries;
use crate::trace::Tracing;
use crate::triggers::{Cron, Queues};

/// Limits of the HTTP surface that are not per function.
#[derive(Debug, Clone)]
pub struct ApiLimits {
    /// Largest component upload.
    pub max_upload: u64,
    /// Longest pause between two chunks of a request body.
    pub body_idle_timeout: Duration,
    /// Whether `GET /metrics` needs the admin token.
    pub metrics_require_token: bool,
    /// Whether `GET /ui` serves the status page.
    pub ui: bool,
    /// What a policy written by a scoped token may not reach.
    pub fences: super::scoped::Fences,
}

/// Everything a request handler needs; one per host.
pub struct AppState {
    pub functions: Arc<Functions>,
    /// Where `{"oci": ...}` deploys pull from.
    pub(super) registries: Registries,
    pub(super) admin_token: String,
    pub(super) limits: ApiLimits,
    pub(super) request_ids: RequestIds,
    /// Set once the host has joined a cluster.
    cluster: OnceLock<Arc<Cluster>>,
    /// Set when a shutdown signal arrives: `/readyz` answers 503 from then
    /// on while the host drains.
    draining: AtomicBool,
    /// Traces of invocations (off unless an OTLP endpoint is configured).
    pub tracing: Tracing,
    /// The latest runs of cron triggers.
    pub cron: Cron,
    /// The consumers of NATS triggers.
    pub queues: Queues,
}

impl AppState {
    pub fn new(
        functions: Arc<Functions>,
        registries: Registries,
        admin_token: String,
        limits: ApiLimits,
    ) -> Self {
        AppState {
            functions,
            registries,
            admin_token,
            limits,
            request_ids: RequestIds::new(),
            cluster: OnceLock::new(),
            draining: AtomicBool::new(false),
            tracing: Tracing::default(),
            cron: Cron::default(),
            queues: Queues::default(),
        }
    }

    /// The same state, tracing as `tracing` says.
    pub fn with_tracing(mut self, tracing: Tracing) -> Self {
        self.tracing = tracing;
        self
    }

    /// From now on the host says it is not ready (it still serves).
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.get()
    }

    /// Makes this host a cluster member (once).
    pub fn join(&self, cluster: Arc<Cluster>) {
        let _ = self.cluster.set(cluster);
    }

    pub fn limits(&self) -> &ApiLimits {
        &self.limits
    }

    /// A new request id, for a request the host makes itself.
    pub fn next_request_id(&self) -> String {
        self.request_ids.next()
    }
}

/// Request ids: unique per host run without coordination, short enough to
/// grep. A random prefix per host and a counter.
pub(super) struct RequestIds {
    prefix: u32,
    next: AtomicU64,
}

impl RequestIds {
    fn new() -> Self {
        let mut prefix = [0u8; 4];
        // Without randomness ids are still unique within this run.
        let _ = getrandom::fill(&mut prefix);
        RequestIds {
            prefix: u32::from_le_bytes(prefix),
            next: AtomicU64::new(1),
        }
    }

    pub(super) fn next(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("{:08x}{:08x}", self.prefix, n)
    }
}
