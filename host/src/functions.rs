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
//! - **One path for every change.** Deploys, rollbacks, deletes, policy
//!   edits and entries merged from peers all change a function's record
//!   (its registry entry, `lichen_core::registry`) under one admin lock,
//!   stamped by the host's hybrid logical clock, and the record is on disk
//!   before anyone is told: a change acknowledged is a change that survives
//!   a crash. Invocations never take the lock.
//!
//! The table also holds what every function shares (the engine, the store,
//! policies, the scheduler, metrics), so the API and the cluster's sync loop
//! reach them through one value without depending on each other.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;

use crate::audit::Audit;
use crate::engine::{Deployed, Runtime};
use crate::error::ApiError;
use crate::kv::nats::{CAS_PATIENCE, Rounds};
use crate::kv::{Backend, Kv, KvAccess, KvError};
use crate::metrics::Metrics;
use crate::names::FunctionName;
use crate::outbound::Outbound;
use crate::policy::PolicyTable;
use crate::recent::Recent;
use crate::scheduler::Scheduler;
use crate::secrets::Secrets;
use crate::shared_registry::{SharedRegistry, Written};
use crate::store::{FunctionRecord, KEEP_VERSIONS, ModuleStore, VersionInfo};
use crate::tokens::Tokens;
use lichen_core::registry::{Clock, Entry, MAX_ENTRY_BYTES, Merged, Stamp, Version};

/// How long the module of a deploy whose outcome is unknown is kept.
const IN_DOUBT_FOR: std::time::Duration = std::time::Duration::from_secs(600);

/// How far ahead of this host's clock a stamp heard elsewhere may be by
/// default (`--max-clock-ahead`).
pub const MAX_CLOCK_AHEAD: Duration = Duration::from_secs(60);

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
    calls: AtomicU64,
    /// Every function's record, as on disk (tombstones included); changed
    /// only under the admin lock, after the disk.
    records: RwLock<BTreeMap<FunctionName, FunctionRecord>>,
    /// The hybrid logical clock that stamps changes made here.
    hlc: Mutex<Clock>,
    /// How far ahead of this host's clock a stamp heard elsewhere may be.
    max_ahead: Duration,
    /// When a stamp too far ahead was last logged (once a minute at most).
    ahead_logged: Mutex<Option<Instant>>,
    /// The earliest millisecond of the stamps refused as ahead since the
    /// last look ([`Functions::refused_now_due`]).
    ahead_refused: Mutex<Option<u64>>,
    /// This host's name in the registry (its node id in a cluster).
    origin: String,
    /// The cluster's registry on NATS, where changes are written first
    /// (`--cluster-registry nats`); `None`: gossip only.
    shared: Option<Arc<SharedRegistry>>,
    /// Modules of deploys whose write to the registry on NATS may or may
    /// not have happened, and since when: kept from garbage collection for
    /// [`IN_DOUBT_FOR`], so a write that did land names a module that is
    /// here to fetch.
    in_doubt: Mutex<HashMap<String, Instant>>,
    /// The key-value backend of every function's stores.
    pub kv: Arc<Kv>,
    /// The backend with its metrics, as every invocation is handed it (one
    /// `Arc` to clone per request).
    kv_access: Arc<KvAccess>,
    /// Outbound HTTP of every function: pools and the address fence.
    pub outbound: Arc<Outbound>,
    /// The secrets `[config]` values may name.
    pub secrets: Arc<Secrets>,
    /// Scoped API tokens.
    pub tokens: Arc<Tokens>,
    /// Every admin change, here and applied from peers.
    pub audit: Arc<Audit>,
    /// Each function's last invocations, latencies and log lines.
    pub recent: Arc<Recent>,
}

/// What invocations reach beyond their sandbox, shared by the host.
pub struct Services {
    pub kv: Arc<Kv>,
    pub outbound: Arc<Outbound>,
    pub secrets: Arc<Secrets>,
    pub tokens: Arc<Tokens>,
    pub audit: Arc<Audit>,
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
            calls: AtomicU64::new(1),
            records: RwLock::new(BTreeMap::new()),
            hlc: Mutex::new(Clock::default()),
            max_ahead: MAX_CLOCK_AHEAD,
            ahead_logged: Mutex::new(None),
            ahead_refused: Mutex::new(None),
            origin: "local".to_string(),
            shared: None,
            in_doubt: Mutex::new(HashMap::new()),
            kv_access: Arc::new(KvAccess {
                backend: Arc::clone(&services.kv),
                metrics: metrics_kv,
            }),
            kv: services.kv,
            outbound: services.outbound,
            secrets: services.secrets,
            tokens: services.tokens,
            audit: services.audit,
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
        self.policies.file_text(name)
    }

    /// Names this host in the registry (its node id in a cluster; `local`
    /// until then).
    pub fn with_origin(mut self, origin: String) -> Self {
        self.origin = origin;
        self
    }

    /// Refuses stamps more than `max_ahead` ahead of this host's clock
    /// (`--max-clock-ahead`).
    pub fn with_max_clock_ahead(mut self, max_ahead: Duration) -> Self {
        self.max_ahead = max_ahead;
        self
    }

    /// Writes every change to `shared` first (the cluster's registry on
    /// NATS).
    pub fn with_shared_registry(mut self, shared: Arc<SharedRegistry>) -> Self {
        self.shared = Some(shared);
        self
    }

    /// This host's name in the registry.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The record of `name` (a tombstone, or an entry not applied here yet,
    /// included).
    pub fn record(&self, name: &FunctionName) -> Option<FunctionRecord> {
        let records = self.records.read().unwrap_or_else(|e| e.into_inner());
        records.get(name).cloned()
    }

    /// What `pick` takes from each record, by name, without copying the
    /// records (the gossip round looks at every one of them).
    pub fn scan_records<T>(&self, mut pick: impl FnMut(&FunctionRecord) -> Option<T>) -> Vec<T> {
        let records = self.records.read().unwrap_or_else(|e| e.into_inner());
        records.values().filter_map(&mut pick).collect()
    }

    /// A stamp for a change made here now.
    pub fn tick(&self) -> Stamp {
        self.hlc
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .tick(crate::recent::now_unix_ms())
    }

    /// Takes a stamp heard from a peer or NATS (`source`: `registry`,
    /// `secret`, `token`) into the clock, unless it is more than
    /// `--max-clock-ahead` ahead of this host's clock: then it is refused,
    /// counted in `lichen_clock_ahead_refused_total{source}` and logged (once
    /// a minute), and the caller must not adopt what it stamps.
    pub fn admit_stamp(&self, stamp: Stamp, source: &str, what: &str) -> bool {
        let now_ms = crate::recent::now_unix_ms();
        if !lichen_core::registry::is_ahead(stamp, now_ms, self.max_ahead.as_millis() as u64) {
            self.observe(stamp);
            return true;
        }
        self.metrics
            .clock_ahead_refused
            .with_label_values(&[source])
            .inc();
        let ms = lichen_core::registry::stamp_ms(stamp);
        let mut refused = self.ahead_refused.lock().unwrap_or_else(|e| e.into_inner());
        *refused = Some(refused.map_or(ms, |earliest| earliest.min(ms)));
        drop(refused);
        let mut logged = self.ahead_logged.lock().unwrap_or_else(|e| e.into_inner());
        if logged.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
            *logged = Some(Instant::now());
            tracing::warn!(
                source,
                what,
                ahead_ms = lichen_core::registry::stamp_ms(stamp).saturating_sub(now_ms),
                max_ahead_ms = self.max_ahead.as_millis() as u64,
                "refused a change stamped too far ahead of this host's clock (a clock running ahead?); counted in lichen_clock_ahead_refused_total, logged once a minute"
            );
        }
        false
    }

    /// Whether a stamp refused as ahead is within the bound now (the clock
    /// caught up): then what was refused is read again, once.
    pub fn refused_now_due(&self) -> bool {
        let mut refused = self.ahead_refused.lock().unwrap_or_else(|e| e.into_inner());
        let due = refused.is_some_and(|ms| {
            !lichen_core::registry::is_ahead(
                lichen_core::registry::stamp_of_ms(ms),
                crate::recent::now_unix_ms(),
                self.max_ahead.as_millis() as u64,
            )
        });
        if due {
            *refused = None;
        }
        due
    }

    /// The answer when a change from elsewhere is refused by
    /// [`Functions::admit_stamp`].
    fn clock_ahead(&self, name: &FunctionName) -> ApiError {
        ApiError::new(
            http::StatusCode::CONFLICT,
            "clock_ahead",
            format!(
                "the registry's entry of {name} is stamped more than {:?} ahead of this host's clock; it is not taken until the clocks agree",
                self.max_ahead
            ),
        )
    }

    /// Notes a stamp seen at a peer: changes made here later are after it.
    pub fn observe(&self, stamp: Stamp) {
        self.hlc
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .observe(stamp);
    }

    /// A stamp for a change made here now, later than `seen` (the version
    /// it replaces, which may come from a peer whose clock is ahead).
    pub fn tick_after(&self, seen: Stamp) -> Stamp {
        self.observe(seen);
        self.tick()
    }

    /// Writes `record` to disk, then to the table of records. Callers hold
    /// the admin lock.
    fn commit(&self, record: FunctionRecord) -> Result<(), ApiError> {
        self.store.write_record(&record)?;
        self.records
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(record.name.clone(), record);
        Ok(())
    }

    /// With the registry on NATS: joins its latest entry of `name` into the
    /// record here first, so a change is decided on what the cluster has
    /// (the no-op deploy, the version rolled back to). Callers hold the
    /// admin lock.
    async fn refresh(&self, admin: &AdminGuard<'_>, name: &FunctionName) -> Result<(), ApiError> {
        let Some(shared) = &self.shared else {
            return Ok(());
        };
        let (latest, _) = shared.read(name).await.map_err(registry_unavailable)?;
        if let Some(latest) = latest {
            self.merge(admin, name, &latest)?;
        }
        Ok(())
    }

    /// Makes `change` on `record`'s entry. With the registry on NATS, on
    /// its latest entry of the name (joined into the record's) and written
    /// there before anything else: if someone wrote the name in between,
    /// the change is made again on the newer entry, for up to
    /// [`CAS_PATIENCE`]; past it, `409 registry_contended` with the
    /// revision it lost to.
    async fn make_change(
        &self,
        record: &mut FunctionRecord,
        mut change: impl FnMut(&Self, &mut Entry) -> Result<(), ApiError>,
    ) -> Result<(), ApiError> {
        let Some(shared) = &self.shared else {
            return change(self, &mut record.entry);
        };
        let name = record.name.clone();
        let mut rounds = Rounds::new();
        while rounds.next().await {
            let (latest, revision) = shared.read(&name).await.map_err(registry_unavailable)?;
            let mut entry = record.entry.clone();
            if let Some(latest) = latest {
                if !self.admit_stamp(latest.max_stamp(), "registry", name.as_str()) {
                    return Err(self.clock_ahead(&name));
                }
                entry.merge(&latest);
            }
            change(self, &mut entry)?;
            match shared.write(&name, &entry, revision).await {
                Ok(Written::At(_)) => {
                    record.entry = entry;
                    return Ok(());
                }
                Ok(Written::Lost) => {}
                Err(error) => {
                    // The write may have landed: its modules stay here to
                    // be fetched if it did.
                    let mut in_doubt = self.in_doubt.lock().unwrap_or_else(|e| e.into_inner());
                    for version in &entry.versions {
                        in_doubt.insert(version.sha256.clone(), Instant::now());
                    }
                    return Err(ApiError::new(
                        http::StatusCode::GATEWAY_TIMEOUT,
                        "registry_in_doubt",
                        format!(
                            "the cluster's registry (NATS) did not confirm the write of {name}, so the change may or may not have been made (GET the function to see): {}",
                            error.detail()
                        ),
                    ));
                }
            }
        }
        let (_, revision) = shared.read(&name).await.map_err(registry_unavailable)?;
        Err(ApiError::new(
            http::StatusCode::CONFLICT,
            "registry_contended",
            format!(
                "{name} kept changing in the cluster's registry for {} s; this change was not made (it lost to revision {revision}); try again",
                CAS_PATIENCE.as_secs()
            ),
        )
        .with_revision(revision))
    }

    /// Deploys `bytes` as a new version of `name` made here, active at
    /// once. `None`: those bytes are the active version already (nothing
    /// changes).
    pub async fn deploy(
        self: &Arc<Self>,
        _admin: &AdminGuard<'_>,
        name: &FunctionName,
        bytes: Bytes,
        oci: Option<crate::oci::OciSource>,
    ) -> Result<Option<VersionInfo>, ApiError> {
        let sha256 = crate::store::sha256_hex(&bytes);
        self.refresh(_admin, name).await?;
        let mut record = self
            .record(name)
            .unwrap_or_else(|| FunctionRecord::new(name.clone()));
        let active = record.entry.active().map(|v| (v.id, v.sha256.clone()));
        if let (Some((id, sha)), Some(serving)) = (&active, &record.serving)
            && *sha == sha256
            && serving.version == *id
        {
            return Ok(None);
        }
        let mut random = [0u8; 8];
        getrandom::fill(&mut random)
            .map_err(|e| ApiError::internal(anyhow::anyhow!("no randomness: {e}")))?;
        let version = Version {
            id: record.entry.fresh_id(u64::from_le_bytes(random)),
            sha256,
            size: bytes.len() as u64,
            stamp: self.tick(),
            origin: self.origin.clone(),
            parent: active.map(|(id, _)| id),
        };
        if let Some(oci) = oci {
            record.oci.insert(version.id, oci);
        }
        let info = record.info(&version);
        let deployed = self.prepare(name, info, Some(bytes)).await?;
        // Made on the latest entry: after whatever was deployed meanwhile.
        self.make_change(&mut record, |functions, entry| {
            if entry.version(version.id).is_some() {
                return Err(ApiError::new(
                    http::StatusCode::CONFLICT,
                    "registry_contended",
                    format!("{name} has a version {} already; deploy again", version.id),
                ));
            }
            let mut version = version.clone();
            version.parent = entry.active().map(|v| v.id);
            version.stamp = functions.tick();
            entry.deploy(version);
            Ok(())
        })
        .await?;
        record.serving = Some(deployed.version.clone());
        let installed = deployed.version.clone();
        self.install(record, deployed)?;
        Ok(Some(installed))
    }

    /// Makes a kept version active again, as a change made here: `wanted`,
    /// or the version deployed before the active one.
    pub async fn rollback(
        self: &Arc<Self>,
        _admin: &AdminGuard<'_>,
        name: &FunctionName,
        wanted: Option<u64>,
    ) -> Result<VersionInfo, ApiError> {
        self.refresh(_admin, name).await?;
        let mut record = self
            .record(name)
            .filter(|r| r.entry.active().is_some())
            .ok_or_else(|| ApiError::not_found(format!("no function named {name}")))?;
        let entry = &record.entry;
        let remembered: Vec<u64> = entry.versions.iter().map(|v| v.id).collect();
        let active = entry.active().map_or(0, |v| v.id);
        let target = match wanted {
            Some(id) => entry.version(id).cloned().ok_or_else(|| {
                ApiError::new(
                    http::StatusCode::NOT_FOUND,
                    "no_such_version",
                    format!(
                        "{name} has no version {id} (the cluster keeps its last {KEEP_VERSIONS} versions and their modules); kept: {remembered:?}"
                    ),
                )
            })?,
            None => {
                let at = entry.versions.iter().position(|v| v.id == active);
                at.and_then(|at| at.checked_sub(1))
                    .and_then(|before| entry.versions.get(before))
                    .cloned()
                    .ok_or_else(|| {
                        ApiError::new(
                            http::StatusCode::CONFLICT,
                            "no_previous_version",
                            format!(
                                "{name} has no version before {active} to roll back to; kept: {remembered:?}"
                            ),
                        )
                    })?
            }
        };
        if target.id == active
            && let Some(serving) = record.serving.clone().filter(|s| s.version == active)
        {
            return Ok(serving);
        }
        if !self.store.has_module(&target.sha256) {
            return Err(ApiError::new(
                http::StatusCode::CONFLICT,
                "module_unavailable",
                format!(
                    "the module of version {} of {name} is not on this host yet (it is fetched from the peer that holds it); try again, or on a host that has it",
                    target.id
                ),
            ));
        }
        let info = record.info(&target);
        let deployed = self.prepare(name, info, None).await?;
        self.make_change(&mut record, |functions, entry| {
            if entry.version(target.id).is_none() {
                return Err(ApiError::new(
                    http::StatusCode::CONFLICT,
                    "registry_contended",
                    format!(
                        "version {} of {name} left the kept versions while rolling back to it",
                        target.id
                    ),
                ));
            }
            entry.point_head(Some(target.id), functions.tick(), &functions.origin);
            Ok(())
        })
        .await?;
        record.serving = Some(deployed.version.clone());
        let installed = deployed.version.clone();
        self.install(record, deployed)?;
        Ok(installed)
    }

    /// Deletes `name`, as a change made here; `false` if it was not
    /// deployed. The tombstone is on disk before the function goes.
    pub async fn delete(
        &self,
        _admin: &AdminGuard<'_>,
        name: &FunctionName,
    ) -> Result<bool, ApiError> {
        self.refresh(_admin, name).await?;
        let Some(mut record) = self.record(name).filter(|r| r.entry.active().is_some()) else {
            return Ok(false);
        };
        self.make_change(&mut record, |functions, entry| {
            entry.point_head(None, functions.tick(), &functions.origin);
            Ok(())
        })
        .await?;
        self.stop_serving(record)?;
        Ok(true)
    }

    /// Refuses a policy text that would make `name`'s registry entry too
    /// large to gossip (`413`, naming the limit).
    pub fn check_policy_size(&self, name: &FunctionName, text: &str) -> Result<(), ApiError> {
        let mut entry = self
            .record(name)
            .map_or_else(|| Entry::new(name.as_str()), |r| r.entry);
        entry.set_policy(text.to_string(), Stamp::MAX, &self.origin);
        // As large as the entry can grow: versions up to the window and
        // the active one, each as long as a version gets.
        let widest = Version {
            id: (1 << 53) - 1,
            sha256: "f".repeat(64),
            size: u64::MAX,
            stamp: Stamp::MAX,
            origin: self.origin.clone(),
            parent: Some((1 << 53) - 1),
        };
        while entry.versions.len() <= KEEP_VERSIONS {
            entry.versions.push(widest.clone());
        }
        let size = entry.encoded_len();
        if size > MAX_ENTRY_BYTES {
            return Err(ApiError::too_large(format!(
                "this policy would make {name}'s registry entry {size} bytes, over the {MAX_ENTRY_BYTES} bytes an entry may take (it travels in one gossip datagram); shorten the policy (comments count)"
            )));
        }
        Ok(())
    }

    /// Records a policy text for `name` as a change made here (the file is
    /// the caller's). `false` if the registry has no entry of `name`.
    pub async fn set_policy(
        &self,
        _admin: &AdminGuard<'_>,
        name: &FunctionName,
        text: String,
    ) -> Result<bool, ApiError> {
        self.refresh(_admin, name).await?;
        let Some(mut record) = self.record(name) else {
            return Ok(false);
        };
        if record.entry.policy.as_ref().is_some_and(|p| p.text == text) {
            return Ok(true);
        }
        self.check_policy_size(name, &text)?;
        self.make_change(&mut record, |functions, entry| {
            entry.set_policy(text.clone(), functions.tick(), &functions.origin);
            Ok(())
        })
        .await?;
        self.commit(record)?;
        Ok(true)
    }

    /// Joins an entry a peer publishes into this host's record of the
    /// function (creating it). What this host serves does not change here:
    /// see [`Functions::serve_active`].
    pub fn merge(
        &self,
        _admin: &AdminGuard<'_>,
        name: &FunctionName,
        entry: &Entry,
    ) -> Result<Merged, ApiError> {
        if !self.admit_stamp(entry.max_stamp(), "registry", name.as_str()) {
            return Err(self.clock_ahead(name));
        }
        let mut record = self
            .record(name)
            .unwrap_or_else(|| FunctionRecord::new(name.clone()));
        let merged = record.entry.merge(entry);
        if merged.changed {
            let kept: Vec<u64> = record.entry.versions.iter().map(|v| v.id).collect();
            record.oci.retain(|id, _| kept.contains(id));
            self.commit(record)?;
            self.collect_garbage();
        }
        Ok(merged)
    }

    /// Makes what this host serves of `name` the registry's active version
    /// (compiling it: its module must be on disk, or given as `bytes`), or
    /// removes the function if the registry says it is deleted.
    pub async fn serve_active(
        self: &Arc<Self>,
        _admin: &AdminGuard<'_>,
        name: &FunctionName,
        bytes: Option<Bytes>,
    ) -> Result<(), ApiError> {
        let Some(mut record) = self.record(name) else {
            return Ok(());
        };
        let Some(active) = record.entry.active().cloned() else {
            if record.entry.is_deleted() && record.serving.is_some() {
                self.stop_serving(record)?;
            }
            return Ok(());
        };
        if record
            .serving
            .as_ref()
            .is_some_and(|s| s.version == active.id)
        {
            return Ok(());
        }
        // Bytes fetched for what was active when the fetch began: only
        // what they are the module of.
        let bytes = bytes.filter(|b| crate::store::sha256_hex(b) == active.sha256);
        let info = record.info(&active);
        let deployed = self.prepare(name, info, bytes).await?;
        record.serving = Some(deployed.version.clone());
        self.install(record, deployed)
    }

    /// Records that `record` is what this host serves now and swaps its
    /// code in.
    fn install(&self, record: FunctionRecord, deployed: Deployed) -> Result<(), ApiError> {
        self.commit(record)?;
        self.insert(deployed);
        self.collect_garbage();
        Ok(())
    }

    /// Records that this host serves nothing of `record`'s function and
    /// takes it out of the table.
    fn stop_serving(&self, mut record: FunctionRecord) -> Result<(), ApiError> {
        let name = record.name.clone();
        record.serving = None;
        record.oci.clear();
        self.commit(record)?;
        self.table
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&name);
        self.scheduler.remove(name.as_str());
        self.metrics.forget_function(name.as_str());
        self.outbound.forget_function(name.as_str());
        self.recent.forget(name.as_str());
        self.collect_garbage();
        Ok(())
    }

    /// Removes the modules no record refers to (from the records in
    /// memory, which are the disk's), but those of deploys in doubt.
    fn collect_garbage(&self) {
        let mut referenced: HashSet<String> = {
            let mut in_doubt = self.in_doubt.lock().unwrap_or_else(|e| e.into_inner());
            in_doubt.retain(|_, since| since.elapsed() < IN_DOUBT_FOR);
            in_doubt.keys().cloned().collect()
        };
        {
            let records = self.records.read().unwrap_or_else(|e| e.into_inner());
            for record in records.values() {
                referenced.extend(record.modules().map(str::to_string));
            }
        }
        if let Err(error) = self.store.collect_garbage_except(&referenced) {
            tracing::warn!(error = format!("{error:#}"), "collecting unused modules");
        }
    }

    /// Compiles `version` (or loads its cached code) and stores its module
    /// if `bytes` are given: a function ready to swap in, with its ABI.
    async fn prepare(
        self: &Arc<Self>,
        name: &FunctionName,
        version: VersionInfo,
        bytes: Option<Bytes>,
    ) -> Result<Deployed, ApiError> {
        // Compiling takes milliseconds to seconds of CPU: off the async workers.
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
        .map_err(|e| ApiError::internal(anyhow::anyhow!("compile task failed: {e}")))?
    }

    /// Reads every record, and puts every served version in the table,
    /// unloaded. Returns how many functions are served.
    pub fn load_stored(&self) -> anyhow::Result<usize> {
        let records = self.store.load_records()?;
        let mut hlc = self.hlc.lock().unwrap_or_else(|e| e.into_inner());
        let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
        let mut all = self.records.write().unwrap_or_else(|e| e.into_inner());
        for record in records {
            hlc.observe(record.entry.max_stamp());
            if let Some(version) = record.serving.clone() {
                let slot = Slot::new(record.name.clone(), version, None);
                table.insert(record.name.clone(), Arc::new(slot));
            }
            all.insert(record.name.clone(), record);
        }
        Ok(table.len())
    }

    /// The function's code, loading it on first use (from the compiled-code
    /// cache, or compiling if the cache cannot be used). Loading one more
    /// function than `max_loaded` unloads the one called least recently.
    pub async fn load(self: &Arc<Self>, slot: &Arc<Slot>) -> Result<Arc<Deployed>, ApiError> {
        slot.touch(&self.calls);
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
        slot.touch(&self.calls);
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

/// The cluster's registry on NATS could not be read: nothing changed.
fn registry_unavailable(error: KvError) -> ApiError {
    ApiError::new(
        http::StatusCode::SERVICE_UNAVAILABLE,
        "registry_unavailable",
        format!(
            "the cluster's registry (NATS) cannot be read, so nothing changed: {}",
            error.detail()
        ),
    )
    .retry_after(crate::error::RETRY_AFTER_SECS)
}
