//! What serving one function version under one policy takes, built once
//! when the pair is first invoked instead of per request: the admission
//! gate, the metric series, the status history, the template of each
//! invocation's sandbox, and, for a function that reuses instances, its
//! pool. A new policy or version gets a new `Serving`; the old one goes
//! when the invocations holding it are done (its pool's idle instances
//! with it).

use std::sync::{Arc, LazyLock};

use crate::engine::Deployed;
use crate::functions::Functions;
use crate::metrics::FunctionMetrics;
use crate::policy::Policy;
use crate::pool::Pool;
use crate::recent::History;
use crate::sandbox::{InstanceEvent, Invocation, InvocationStats};
use crate::scheduler::Gate;

pub struct Serving {
    pub policy: Arc<Policy>,
    pub gate: Arc<Gate>,
    pub metrics: Arc<FunctionMetrics>,
    pub history: History,
    /// Called once when a response is cut at the policy's limit.
    pub on_cut: Arc<dyn Fn() + Send + Sync>,
    /// Each invocation's sandbox, but for its request id and figures.
    invocation: Invocation,
    /// The instances, when the policy reuses them.
    pub pool: Option<Arc<Pool>>,
}

type OnInstance = Arc<dyn Fn(InstanceEvent) + Send + Sync>;
type OnMemoryPeak = Arc<dyn Fn(usize) + Send + Sync>;

impl Serving {
    /// What serving `function` under `policy` takes: made the first time,
    /// then kept with the function until the policy changes.
    pub fn of(functions: &Functions, function: &Deployed, policy: &Arc<Policy>) -> Arc<Serving> {
        function.attached(
            |serving: &Serving| Arc::ptr_eq(&serving.policy, policy),
            || Serving::new(functions, function, Arc::clone(policy)),
        )
    }

    fn new(functions: &Functions, function: &Deployed, policy: Arc<Policy>) -> Self {
        static NO_EVENTS: LazyLock<OnInstance> = LazyLock::new(|| Arc::new(|_| {}));
        static NO_PEAKS: LazyLock<OnMemoryPeak> = LazyLock::new(|| Arc::new(|_| {}));
        let name = function.name.as_str();
        let metrics = Arc::new(functions.metrics.function(name));
        let each = |f: fn(&FunctionMetrics)| {
            let metrics = Arc::clone(&metrics);
            Arc::new(move || f(&metrics)) as Arc<dyn Fn() + Send + Sync>
        };
        // Instance events and memory peaks at retirement are a reusing
        // function's; a fresh instance's peak is recorded with its request.
        let (on_instance, on_memory_peak): (OnInstance, OnMemoryPeak) = if policy.reuses_instances()
        {
            let events = Arc::clone(&metrics);
            let peaks = Arc::clone(&metrics);
            (
                Arc::new(move |event: InstanceEvent| events.instance(event.as_str())),
                Arc::new(move |peak| peaks.record_memory_peak(peak)),
            )
        } else {
            (Arc::clone(&NO_EVENTS), Arc::clone(&NO_PEAKS))
        };
        let invocation = Invocation {
            function: Arc::from(name),
            request_id: Arc::from(""),
            policy: Arc::clone(&policy),
            on_denied: each(FunctionMetrics::outbound_denied),
            stats: Arc::new(InvocationStats::default()),
            on_instance,
            on_memory_peak,
            kv: Some(functions.kv_access()),
            outbound: Some(Arc::clone(&functions.outbound)),
            recent: Some(Arc::clone(&functions.recent)),
            secrets: Some(Arc::clone(&functions.secrets)),
            trace: None,
        };
        let on_cut = {
            let metrics = Arc::clone(&metrics);
            let limit = policy.response_body;
            Arc::new(move || {
                metrics.response_cut();
                tracing::warn!(
                    function = metrics.name(),
                    limit,
                    "response body cut off at the policy limit"
                );
            })
        };
        let pool = policy
            .reuses_instances()
            .then(|| functions.runtime.pool(function, &invocation));
        Serving {
            gate: functions
                .scheduler
                .gate(name, policy.concurrency, policy.queue),
            history: functions.recent.history(name),
            policy,
            metrics,
            on_cut,
            invocation,
            pool,
        }
    }

    /// The sandbox of one request.
    pub fn invocation(&self, request_id: &str, stats: Arc<InvocationStats>) -> Invocation {
        Invocation {
            request_id: Arc::from(request_id),
            stats,
            ..self.invocation.clone()
        }
    }
}
