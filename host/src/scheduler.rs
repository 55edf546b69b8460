//! Admission: how many invocations of a function run at once, how many may
//! wait, and a cap on all in-flight work of the host.
//!
//! Each function has a semaphore of `concurrency` permits and a bounded
//! queue of `queue` waiters. A request that finds both full is refused at
//! once with 503 and `Retry-After` rather than piling up: an edge host that
//! is over capacity should say so quickly so the client (or, later, a peer)
//! can go elsewhere. A waiter gives up when its deadline passes.
//!
//! When a policy changes `concurrency` or `queue`, the function gets a new
//! gate; invocations holding permits of the old one finish undisturbed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The function's permits and queue are full.
    FunctionBusy,
    /// The host's cap on in-flight invocations is reached.
    HostBusy,
    /// It waited in the queue until its deadline.
    QueueTimeout,
}

/// The admission gate of one function.
pub struct Gate {
    permits: Arc<Semaphore>,
    concurrency: u32,
    queue_cap: u32,
    queued: AtomicU32,
}

impl Gate {
    fn new(concurrency: u32, queue_cap: u32) -> Self {
        Gate {
            permits: Arc::new(Semaphore::new(concurrency as usize)),
            concurrency,
            queue_cap,
            queued: AtomicU32::new(0),
        }
    }

    /// Invocations running now.
    pub fn in_flight(&self) -> u32 {
        self.concurrency
            .saturating_sub(self.permits.available_permits() as u32)
    }

    /// Invocations waiting now.
    pub fn queued(&self) -> u32 {
        self.queued.load(Ordering::Relaxed)
    }
}

/// Held while an invocation runs; dropping it lets the next one in.
pub struct Admission {
    _function: OwnedSemaphorePermit,
    _host: OwnedSemaphorePermit,
}

pub struct Scheduler {
    gates: Mutex<HashMap<String, Arc<Gate>>>,
    host: Arc<Semaphore>,
    max_in_flight: u32,
}

impl Scheduler {
    pub fn new(max_in_flight: u32) -> Self {
        Scheduler {
            gates: Mutex::new(HashMap::new()),
            host: Arc::new(Semaphore::new(max_in_flight as usize)),
            max_in_flight,
        }
    }

    /// The gate of `function` for these limits (a new one if they changed).
    pub fn gate(&self, function: &str, concurrency: u32, queue: u32) -> Arc<Gate> {
        let mut gates = self.gates.lock().unwrap_or_else(|e| e.into_inner());
        match gates.get(function) {
            Some(gate) if gate.concurrency == concurrency && gate.queue_cap == queue => {
                Arc::clone(gate)
            }
            _ => {
                let gate = Arc::new(Gate::new(concurrency, queue));
                gates.insert(function.to_string(), Arc::clone(&gate));
                gate
            }
        }
    }

    /// Invocations of `function` running and waiting now.
    pub fn load(&self, function: &str) -> (u32, u32) {
        let gates = self.gates.lock().unwrap_or_else(|e| e.into_inner());
        gates
            .get(function)
            .map_or((0, 0), |gate| (gate.in_flight(), gate.queued()))
    }

    /// Forgets a deleted function's gate.
    pub fn remove(&self, function: &str) {
        self.gates
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(function);
    }

    /// Free slots of the host and invocations in flight, for peers.
    pub fn host_load(&self) -> (u32, u32) {
        let free = self.host.available_permits() as u32;
        (free, self.max_in_flight.saturating_sub(free))
    }

    /// A permit of `gate` and one of the host's if both are free now.
    pub fn try_admit(&self, gate: &Gate) -> Result<Admission, Refusal> {
        let function = Arc::clone(&gate.permits)
            .try_acquire_owned()
            .map_err(|_| Refusal::FunctionBusy)?;
        self.with_host_permit(function)
    }

    /// Waits for a permit of `gate` (at most `wait`), then takes one of the
    /// host's. Waiting in a function's queue does not hold host capacity.
    pub async fn admit(&self, gate: &Gate, wait: Duration) -> Result<Admission, Refusal> {
        let function = match Arc::clone(&gate.permits).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                let queued = gate
                    .queued
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                        (n < gate.queue_cap).then_some(n + 1)
                    });
                if queued.is_err() {
                    return Err(Refusal::FunctionBusy);
                }
                let waited =
                    tokio::time::timeout(wait, Arc::clone(&gate.permits).acquire_owned()).await;
                gate.queued.fetch_sub(1, Ordering::AcqRel);
                match waited {
                    Ok(Ok(permit)) => permit,
                    // The semaphore is never closed; treat it like a full queue.
                    Ok(Err(_)) => return Err(Refusal::FunctionBusy),
                    Err(_) => return Err(Refusal::QueueTimeout),
                }
            }
        };
        self.with_host_permit(function)
    }

    /// Adds one of the host's permits to a function's, if one is free.
    fn with_host_permit(&self, function: OwnedSemaphorePermit) -> Result<Admission, Refusal> {
        let host = Arc::clone(&self.host)
            .try_acquire_owned()
            .map_err(|_| Refusal::HostBusy)?;
        Ok(Admission {
            _function: function,
            _host: host,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_gate_and_queue_refuse_at_once() {
        let scheduler = Scheduler::new(100);
        let gate = scheduler.gate("f", 1, 1);
        let first = scheduler
            .admit(&gate, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(gate.in_flight(), 1);
        let waiting = {
            let gate = Arc::clone(&gate);
            let scheduler = Arc::new(scheduler);
            let s = Arc::clone(&scheduler);
            let handle =
                tokio::spawn(async move { s.admit(&gate, Duration::from_secs(5)).await.is_ok() });
            (handle, scheduler)
        };
        while gate.queued() == 0 {
            tokio::task::yield_now().await;
        }
        let refused = waiting.1.admit(&gate, Duration::from_secs(5)).await;
        assert_eq!(refused.err(), Some(Refusal::FunctionBusy));
        drop(first);
        assert!(waiting.0.await.unwrap());
    }

    #[tokio::test]
    async fn new_limits_make_a_new_gate() {
        let scheduler = Scheduler::new(100);
        let a = scheduler.gate("f", 2, 0);
        assert!(Arc::ptr_eq(&a, &scheduler.gate("f", 2, 0)));
        assert!(!Arc::ptr_eq(&a, &scheduler.gate("f", 3, 0)));
    }

    #[tokio::test]
    async fn the_host_cap_applies_across_functions() {
        let scheduler = Scheduler::new(1);
        let a = scheduler.gate("a", 5, 5);
        let b = scheduler.gate("b", 5, 5);
        let _held = scheduler.admit(&a, Duration::from_secs(1)).await.unwrap();
        assert_eq!(
            scheduler.admit(&b, Duration::from_secs(1)).await.err(),
            Some(Refusal::HostBusy)
        );
    }
}
