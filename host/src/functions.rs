//! The host's live function table: which functions are deployed, which
//! version of each is active, and the compiled code of those loaded now.
//!
//! Why it is built this way:
//! - **Lazy loading.** At start the host reads function records only; a
//!   function's compiled code is loaded (memory-mapped from the cache, or
//!   compiled if the cache cannot be used) on its first call. Start time and
//!   memory do not grow with the number of functions deployed.
//! - **A cap on loaded code.** Beyond `max_loaded` functions, the least
//!   recently called are unloaded; an invocation running keeps its own `Arc`
//!   of the code, so unloading never disturbs it, and the next call loads it
//!   again.
//! - **One change at a time.** Deploys and deletes, whether they come from
//!   the admin API or from the cluster's registry, change the store and the
//!   table together under one admin lock; invocations never take it.
//!
//! The table also holds what every function shares (the engine, the store,
//! policies, the scheduler, metrics), so the API and the cluster's sync loop
//! reach them through one value without depending on each other.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use anyhow::Context;
use bytes::Bytes;

use crate::engine::{Deployed, Runtime};
use crate::error::ApiError;
use crate::kv::{Backend, Kv, KvAccess};
use crate::metrics::Metrics;
use crate::names::FunctionName;
use crate::outbound::Outbound;
use crate::policy::PolicyTable;
use crate::recent::Recent;
use crate::scheduler::Scheduler;
use crate::store::{FunctionRecord, ModuleStore, VersionInfo};

/// The admin lock, held while a deploy or delete changes the store and the
/// table together.
pub type AdminGuard<'a> = tokio::sync::MutexGuard<'a, ()>;

/// The deployed functions of one host and what they share.
pub struct Functions {
    pub runtime: Runtime,
    pub store: ModuleStore,
    pub metrics: Metrics,
    pub policies: Arc<PolicyTable>,
    pub scheduler: Scheduler,
    table: RwLock<HashMap<FunctionName, Arc<Slot>>>,
    /// How many functions keep their compiled code loaded.
    max_loaded: usize,
    /// Deploys and deletes change the store and the table together; one at a
    /// time keeps them in step. Invocations never take it.
    admin_lock: tokio::sync::Mutex<()>,
    /// Counts calls, to order functions by how recently they were called.
    clock: AtomicU64,
    /// The key-value backend of every function's stores.
    pub kv: Arc<Kv>,
    /// The backend with its metrics, as every invocation is handed it (one
    /// `Arc` to clone per request).
    kv_access: Arc<KvAccess>,
    /// Outbound HTTP of every function: pools and the address fence.
    pub outbound: Arc<Outbound>,
    /// Each function's last invocations, latencies and log lines.
    pub recent: Arc<Recent>,
}

/// What invocations reach beyond their sandbox, shared by the host.
pub struct Services {
    pub kv: Arc<Kv>,
    pub outbound: Arc<Outbound>,
}

impl Functions {
    pub fn new(
        runtime: Runtime,
        store: ModuleStore,
        metrics: Metrics,
        policies: Arc<PolicyTable>,
        scheduler: Scheduler,
        max_loaded: usize,
        services: Services,
    ) -> Self {
        let metrics_kv = metrics.kv.clone();
        Functions {
            runtime,
            store,
            metrics,
            policies,
            scheduler,
            table: RwLock::new(HashMap::new()),
            max_loaded,
            admin_lock: tokio::sync::Mutex::new(()),
            clock: AtomicU64::new(1),
            kv_access: Arc::new(KvAccess {
                backend: Arc::clone(&services.kv),
                metrics: metrics_kv,
            }),
            kv: services.kv,
            outbound: services.outbound,
            recent: Arc::new(Recent::new()),
        }
    }

    /// How many functions may keep their compiled code loaded.
    pub fn max_loaded(&self) -> usize {
        self.max_loaded
    }

    /// What an invocation is handed of the key-value backend.
    pub fn kv_access(&self) -> Arc<KvAccess> {
        Arc::clone(&self.kv_access)
    }

    /// Deploys and deletes (local or from the cluster) take this first.
    pub async fn lock_admin(&self) -> AdminGuard<'_> {
        self.admin_lock.lock().await
    }

    /// The deployed function called `name`, loaded or not.
    pub fn lookup(&self, name: &str) -> Option<Arc<Slot>> {
        let name = FunctionName::new(name).ok()?;
        let table = self.table.read().unwrap_or_else(|e| e.into_inner());
        table.get(&name).cloned()
    }

    /// Every deployed function, by name.
    pub fn list(&self) -> Vec<Arc<Slot>> {
        let table = self.table.read().unwrap_or_else(|e| e.into_inner());
        let mut slots: Vec<Arc<Slot>> = table.values().cloned().collect();
        slots.sort_by(|a, b| a.name.cmp(&b.name));
        slots
    }

    /// The SHA-256 of the active version of `name`, if deployed here.
    pub fn active_sha(&self, name: &FunctionName) -> Option<String> {
        self.lookup(name.as_str())
            .map(|slot| slot.version.sha256.clone())
    }

    /// The text of the policy in force for `name`, if it has a file.
    pub fn policy_source(&self, name: &FunctionName) -> Option<String> {
        self.policies.status(name).policy.map(|p| p.text.clone())
    }

    /// The stored record of `name`, or an empty one for a new function.
    pub fn record_or_new(&self, name: &FunctionName) -> Result<FunctionRecord, ApiError> {
        Ok(self
            .store
            .read_record(name)?
            .unwrap_or_else(|| FunctionRecord::new(name.clone())))
    }

    /// Makes `version` the active version of the function of `record` (as
    /// read under the admin lock, which callers hold): compiles it (or loads
    /// its cached code), stores the module if `bytes` are given, records it,
    /// and swaps it in. Returns the version as recorded (with its ABI, which
    /// only compiling the component tells).
    pub async fn activate(
        self: &Arc<Self>,
        _admin: &AdminGuard<'_>,
        record: FunctionRecord,
        version: VersionInfo,
        bytes: Option<Bytes>,
    ) -> Result<VersionInfo, ApiError> {
        let name = &record.name;
        // Compiling takes milliseconds to seconds of CPU: off the async workers.
        let deployed = {
            let functions = Arc::clone(self);
            let name = name.clone();
            tokio::task::spawn_blocking(move || -> Result<Deployed, ApiError> {
                let sha256 = version.sha256.clone();
                let deployed = functions.load_version(&name, version, bytes.as_deref())?;
                if let Some(bytes) = bytes {
                    functions.store.write_module(&sha256, &bytes)?;
                }
                Ok(deployed)
            })
            .await
            .map_err(|e| ApiError::internal(anyhow::anyhow!("compile task failed: {e}")))??
        };
        // The version as prepared: it knows the component's ABI now.
        let mut next = record.clone();
        let installed = deployed.version.clone();
        next.install(installed.clone());
        self.store.write_record(&next)?;
        self.insert(deployed);
        if !record.versions.is_empty() && next.versions.len() <= record.versions.len() {
            // A version was forgotten or replaced: its module may be unused.
            if let Err(error) = self.store.collect_garbage() {
                tracing::warn!(error = format!("{error:#}"), "collecting unused modules");
            }
        }
        Ok(installed)
    }

    /// Deletes `name` from this host; `false` if it was not here. Callers
    /// hold the admin lock.
    pub fn delete(&self, _admin: &AdminGuard<'_>, name: &FunctionName) -> Result<bool, ApiError> {
        if self.store.read_record(name)?.is_none() {
            return Ok(false);
        }
        self.store.remove_record(name)?;
        self.table
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        self.scheduler.remove(name.as_str());
        self.metrics.forget_function(name.as_str());
        self.outbound.forget_function(name.as_str());
        self.recent.forget(name.as_str());
        if let Err(error) = self.store.collect_garbage() {
            tracing::warn!(error = format!("{error:#}"), "collecting unused modules");
        }
        Ok(true)
    }

    /// Puts every stored function's active version in the table, unloaded.
    /// A record without an active version is left out; it stays on disk, so
    /// a later deploy can bring the function back.
    pub fn load_stored(&self) -> anyhow::Result<usize> {
        let records = self.store.load_records()?;
        let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
        for record in records {
            if let Some(version) = record.active_version().cloned() {
                let slot = Slot::new(record.name.clone(), version, None);
                table.insert(record.name, Arc::new(slot));
            }
        }
        Ok(table.len())
    }

    /// The function's code, loading it on first use (from the compiled-code
    /// cache, or compiling if the cache cannot be used). Loading one more
    /// function than `max_loaded` unloads the one called least recently.
    pub async fn load(self: &Arc<Self>, slot: &Arc<Slot>) -> Result<Arc<Deployed>, ApiError> {
        slot.touch(&self.clock);
        if let Some(deployed) = slot.get() {
            return Ok(deployed);
        }
        let _loading = slot.loading.lock().await;
        if let Some(deployed) = slot.get() {
            return Ok(deployed);
        }
        let functions = Arc::clone(self);
        let (name, version) = (slot.name.clone(), slot.version.clone());
        let deployed =
            tokio::task::spawn_blocking(move || functions.load_version(&name, version, None))
                .await
                .map_err(|e| ApiError::internal(anyhow::anyhow!("load task failed: {e}")))??;
        let deployed = Arc::new(deployed);
        *slot.loaded.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::clone(&deployed));
        self.unload_beyond_cap();
        Ok(deployed)
    }

    /// Keeps at most `max_loaded` functions' code in memory: unloading the
    /// least recently called ones (invocations running keep their own `Arc`).
    fn unload_beyond_cap(&self) {
        let cap = self.max_loaded.max(1);
        let table = self.table.read().unwrap_or_else(|e| e.into_inner());
        let mut loaded: Vec<&Arc<Slot>> = table.values().filter(|s| s.get().is_some()).collect();
        if loaded.len() <= cap {
            return;
        }
        loaded.sort_by_key(|s| s.last_used.load(Ordering::Relaxed));
        for slot in &loaded[..loaded.len() - cap] {
            *slot.loaded.write().unwrap_or_else(|e| e.into_inner()) = None;
            tracing::debug!(function = %slot.name, "unloaded (least recently called)");
        }
    }

    /// Turns a stored (or just uploaded) version into a ready function:
    /// compiled code from the cache if present, else compile and cache it.
    fn load_version(
        &self,
        name: &FunctionName,
        version: VersionInfo,
        uploaded: Option<&[u8]>,
    ) -> Result<Deployed, ApiError> {
        let key = self.runtime.cache_key();
        let sha = version.sha256.clone();
        let cached = if self.store.has_compiled(key, &sha) {
            match self
                .runtime
                .load_cached(&self.store.compiled_path(key, &sha))
            {
                Ok(component) => Some(component),
                Err(error) => {
                    tracing::warn!(sha256 = %sha, error = format!("{error:#}"), "recompiling: cached code unusable");
                    None
                }
            }
        } else {
            None
        };
        let (component, fresh) = match cached {
            Some(component) => {
                self.metrics.cache_loads.inc();
                (component, false)
            }
            None => {
                let bytes = match uploaded {
                    Some(bytes) => bytes.to_vec(),
                    None => self.store.read_module(&sha)?,
                };
                let started = Instant::now();
                let component = self.runtime.compile(&bytes)?;
                self.metrics
                    .compile_duration
                    .observe(started.elapsed().as_secs_f64());
                (component, true)
            }
        };
        let deployed = self.runtime.prepare(name.clone(), version, &component)?;
        // Only code that passed every check is cached.
        if fresh {
            let code = component
                .serialize()
                .map_err(anyhow::Error::from)
                .with_context(|| format!("serialising compiled code of {name}"))?;
            self.store.write_compiled(key, &sha, &code)?;
        }
        Ok(deployed)
    }

    fn insert(&self, deployed: Deployed) {
        let slot = Slot::new(
            deployed.name.clone(),
            deployed.version.clone(),
            Some(Arc::new(deployed)),
        );
        slot.touch(&self.clock);
        {
            let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
            table.insert(slot.name.clone(), Arc::new(slot));
        }
        self.unload_beyond_cap();
    }

    /// Sets the gauges that mirror state, just before a scrape.
    /// Sets the per-store key-value gauges from the backend, for deployed
    /// functions only (the `function` label holds no other names).
    pub async fn refresh_kv_gauges(&self) {
        let stores = match self.kv.all_stores().await {
            Ok(stores) => stores,
            Err(error) => {
                tracing::warn!(error = %error, "reading key-value usage for /metrics");
                return;
            }
        };
        let shown: Vec<_> = stores
            .into_iter()
            .filter(|(function, _, _)| self.lookup(function).is_some())
            .collect();
        self.metrics.kv.set_usage(&shown);
    }

    pub fn refresh_gauges(&self) {
        let table = self.table.read().unwrap_or_else(|e| e.into_inner());
        self.metrics.functions.set(table.len() as i64);
        for name in table.keys() {
            let (in_flight, queued) = self.scheduler.load(name.as_str());
            let name = name.as_str();
            self.metrics
                .inflight
                .with_label_values(&[name])
                .set(i64::from(in_flight));
            self.metrics
                .queued
                .with_label_values(&[name])
                .set(i64::from(queued));
        }
    }
}

/// A deployed function: its active version, and its code while loaded.
pub struct Slot {
    pub name: FunctionName,
    pub version: VersionInfo,
    loaded: RwLock<Option<Arc<Deployed>>>,
    /// Serialises loading, so concurrent first calls load once.
    loading: tokio::sync::Mutex<()>,
    /// The table's clock value at the latest call, for unloading.
    last_used: AtomicU64,
}

impl Slot {
    fn new(name: FunctionName, version: VersionInfo, loaded: Option<Arc<Deployed>>) -> Self {
        Slot {
            name,
            version,
            loaded: RwLock::new(loaded),
            loading: tokio::sync::Mutex::new(()),
            last_used: AtomicU64::new(0),
        }
    }

    /// The function's code, if loaded now.
    pub fn get(&self) -> Option<Arc<Deployed>> {
        self.loaded
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn touch(&self, clock: &AtomicU64) {
        let now = clock.fetch_add(1, Ordering::Relaxed);
        self.last_used.store(now, Ordering::Relaxed);
    }
}
