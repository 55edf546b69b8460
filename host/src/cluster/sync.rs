//! The gossip round of a host: publish its load, join its peers' registry
//! entries and secrets into its own, and make what it serves follow them
//! (fetching modules by hash, compiling them itself).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};

use super::{Cluster, Peer};
use crate::audit;
use crate::functions::Functions;
use crate::names::FunctionName;
use crate::policy::SecretName;
use crate::secrets::{Applied, Versioned};
use crate::shared_registry::SharedRegistry;
use crate::store::sha256_hex;
use lichen_core::gossip::{FunctionState, SecretState, TokenState};
use lichen_core::registry::Entry;

/// The first wait after an entry failed to apply; it doubles with each
/// failure in a row, up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// What the round loop keeps between rounds.
#[derive(Default)]
struct Progress {
    /// Names being applied by a task now.
    applying: HashSet<FunctionName>,
    /// Names whose entry failed to apply: failures in a row, next try.
    failed: HashMap<FunctionName, (u32, Instant)>,
    /// Names whose entry applied completely (every kept module here), by
    /// the record's fingerprint: nothing to do until it changes.
    settled: HashMap<FunctionName, u64>,
    /// The policy text this host last wrote to a function's file or
    /// published from it (its hash): a file that says something else was
    /// edited here.
    policies: BTreeMap<FunctionName, u64>,
    /// Edits made here that the registry refused (too large to gossip), by
    /// the file's hash: not tried again until the file changes.
    refused: HashMap<FunctionName, u64>,
    /// Edits made here the registry could not take yet (a full disk, the
    /// registry on NATS unreachable): tried again after this.
    retry_edit: HashMap<FunctionName, Instant>,
    /// Registry policy texts this host failed to write (invalid here, a
    /// full disk), and when: tried again after [`RETRY_MAX`], or at once when
    /// the registry says something else.
    unwritable: HashMap<FunctionName, (String, Instant)>,
}

/// Runs the host's rounds until its function table is dropped. Modules
/// fetched from peers are capped at `max_upload` bytes, like uploads.
pub async fn run(cluster: Arc<Cluster>, state: Weak<Functions>, max_upload: u64) {
    let progress: Arc<Mutex<Progress>> = Arc::default();
    if let Some(state) = state.upgrade() {
        cluster.publish_all(&state).await;
    }
    let mut tick = tokio::time::interval(cluster.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(state) = state.upgrade() else { return };
        let (free, load) = state.scheduler.host_load();
        let free = if cluster.is_draining() { 0 } else { free };
        let fresh = cluster.gossip_round(free, load).await;
        if cluster.refused().is_some() {
            return;
        }
        // Secrets first: a policy that names one can come into force in
        // the same round.
        if merge_secrets(&cluster, &state, fresh.secrets).await {
            let mut progress = progress.lock().unwrap_or_else(|e| e.into_inner());
            progress.unwritable.clear();
        }
        merge_tokens(&cluster, &state, fresh.tokens).await;
        cluster.keep_custody(&state).await;
        // What was refused for a stamp ahead of this host's clock is read
        // again once the clock has caught up (refused again if still ahead).
        if state.refused_now_due() {
            cluster.reread();
            cluster.reread_secrets();
        }
        merge(&cluster, &state, fresh.functions).await;
        for name in unsettled(&state, &progress) {
            let (cluster, state, progress) = (
                Arc::clone(&cluster),
                Arc::clone(&state),
                Arc::clone(&progress),
            );
            tokio::spawn(async move {
                let result = apply(&cluster, &state, &name, max_upload).await;
                let mut progress = progress.lock().unwrap_or_else(|e| e.into_inner());
                progress.applying.remove(&name);
                match result {
                    Ok(stamp) => {
                        progress.failed.remove(&name);
                        progress.settled.insert(name.clone(), stamp);
                        cluster.set_apply_error(name.as_str(), None);
                    }
                    Err(error) => {
                        let failures = progress.failed.get(&name).map_or(0, |(n, _)| *n) + 1;
                        let wait = RETRY_FIRST
                            .saturating_mul(1 << (failures - 1).min(6))
                            .min(RETRY_MAX);
                        progress
                            .failed
                            .insert(name.clone(), (failures, Instant::now() + wait));
                        let error = format!("{error:#}");
                        tracing::warn!(function = %name, failures, retry_in = ?wait, error, "cannot apply the registry's entry yet");
                        state
                            .metrics
                            .registry_apply_failures
                            .with_label_values(&[name.as_str()])
                            .inc();
                        cluster.set_apply_error(name.as_str(), Some(error));
                    }
                }
            });
        }
        sync_policies(&cluster, &state, &progress).await;
    }
}

/// Joins the entries peers published since the last round into this
/// host's records, and publishes the records that changed.
async fn merge(cluster: &Cluster, state: &Functions, fresh: Vec<FunctionState>) {
    join(cluster, state, fresh.into_iter().map(|s| s.entry).collect()).await;
}

/// Takes the API tokens peers published that are newer than this host's:
/// stored and in force for the next request (gossiped on by this host
/// only if it becomes their custodian: [`Cluster::keep_custody`]).
async fn merge_tokens(cluster: &Cluster, state: &Arc<Functions>, fresh: Vec<(String, TokenState)>) {
    let newer: Vec<(String, TokenState)> = fresh
        .into_iter()
        .filter(|(name, peer)| state.admit_stamp(peer.stamp, "token", name))
        .filter(|(name, peer)| {
            state
                .tokens
                .state(name)
                .is_none_or(|held| held.version() < peer.version())
        })
        // Read once per version (the gossip cache): not read again.
        .filter(
            |(name, peer)| match crate::tokens::check_state(name, peer) {
                Ok(()) => true,
                Err(error) => {
                    tracing::warn!(
                        token = name,
                        origin = peer.origin,
                        error,
                        "ignoring a peer's token this host cannot take"
                    );
                    false
                }
            },
        )
        .collect();
    if newer.is_empty() {
        return;
    }
    let functions = Arc::clone(state);
    let applied = tokio::task::spawn_blocking(move || {
        let mut applied = Vec::new();
        let mut failed = false;
        for (name, peer) in newer {
            match functions.tokens.apply(&functions.store, &name, peer) {
                Ok(true) => applied.push(name),
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(
                        token = name,
                        error = format!("{error:#}"),
                        "cannot keep a peer's token"
                    );
                    failed = true;
                }
            }
        }
        (applied, failed)
    })
    .await;
    let (applied, failed) = match applied {
        Ok(done) => done,
        Err(error) => {
            tracing::error!(error = %error, "the task storing peers' tokens failed");
            (Vec::new(), true)
        }
    };
    if failed {
        cluster.reread_secrets();
    }
    for name in applied {
        tracing::info!(token = name, "API token changed on a peer; in force here");
        if let Some(token) = state.tokens.state(&name) {
            let what = if token.revoked {
                "revoke token"
            } else {
                "token"
            };
            let mut entry = from_peer(what, &token.origin);
            entry.name = Some(name);
            state.audit.record(entry).await;
        }
    }
}

/// Takes the secrets peers published that are newer than this host's:
/// stored (sealed with this host's key), in force for the next invocation,
/// and policies that waited for them loaded again (gossiped on by this
/// host only if it becomes their custodian: [`Cluster::keep_custody`]).
/// Whether any changed.
async fn merge_secrets(
    cluster: &Cluster,
    state: &Arc<Functions>,
    fresh: Vec<(String, SecretState)>,
) -> bool {
    let mut newer = Vec::new();
    for (name, peer) in fresh {
        if !state.admit_stamp(peer.stamp, "secret", &name) {
            continue;
        }
        let Ok(name) = SecretName::try_from(name.clone()) else {
            tracing::warn!(
                secret = name,
                "ignoring a peer's secret with an invalid name"
            );
            continue;
        };
        let held = state.secrets.version(&name.0);
        if held.is_some_and(|held| (held.stamp, held.origin.as_str()) >= peer.version()) {
            continue;
        }
        let Some(value) = cluster.open_secret(&name.0, &peer) else {
            tracing::warn!(
                secret = %name.0,
                origin = peer.origin,
                "a peer's secret does not open with this host's cluster secrets; keeping the one here"
            );
            continue;
        };
        let version = Versioned {
            stamp: peer.stamp,
            origin: peer.origin,
            value: value.map(Arc::from),
        };
        newer.push((name, version));
    }
    if newer.is_empty() {
        return false;
    }
    let functions = Arc::clone(state);
    let applied = tokio::task::spawn_blocking(move || {
        let mut applied = Vec::new();
        for (name, version) in newer {
            match functions.secrets.apply(&functions.store, &name, version) {
                Ok(Applied::Older) => {}
                Ok(done) => applied.push((name, done)),
                Err(error) => {
                    tracing::warn!(secret = %name.0, error = format!("{error:#}"), "cannot keep a peer's secret; reading it again next round");
                    return Err(applied);
                }
            }
        }
        Ok(applied)
    })
    .await;
    let applied = match applied {
        Ok(Ok(applied)) => applied,
        Ok(Err(applied)) => {
            cluster.reread_secrets();
            applied
        }
        Err(error) => {
            tracing::error!(error = %error, "the task storing peers' secrets failed");
            cluster.reread_secrets();
            return false;
        }
    };
    for (name, done) in &applied {
        tracing::info!(secret = %name.0, removed = *done == Applied::Removed, "secret changed on a peer; in force here from the next invocation");
        let origin = state.secrets.version(&name.0).map(|v| v.origin);
        let what = if *done == Applied::Removed {
            "remove secret"
        } else {
            "secret"
        };
        let mut entry = from_peer(what, &origin.unwrap_or_default());
        entry.name = Some(name.0.clone());
        state.audit.record(entry).await;
    }
    if applied.iter().any(|(_, done)| *done == Applied::Set) {
        let functions = Arc::clone(state);
        let _ = tokio::task::spawn_blocking(move || functions.policies.reload_failed()).await;
    }
    !applied.is_empty()
}

/// Joins `fresh` entries (from peers, or from the registry on NATS) into
/// this host's records, and publishes the records that changed.
async fn join(cluster: &Cluster, state: &Functions, fresh: Vec<Entry>) {
    let fresh: Vec<(FunctionName, Entry)> = fresh
        .into_iter()
        .filter_map(|entry| Some((FunctionName::new(&entry.name).ok()?, entry)))
        .filter(|(name, entry)| state.record(name).is_none_or(|r| r.entry != *entry))
        .collect();
    if fresh.is_empty() {
        return;
    }
    let guard = state.lock_admin().await;
    let mut changed = Vec::new();
    for (name, entry) in fresh {
        match state.merge(&guard, &name, &entry) {
            Ok(merged) => {
                for conflict in merged.conflicts {
                    cluster.note_conflict(conflict);
                }
                if merged.changed {
                    changed.push(name);
                }
            }
            // Refused for its stamp: counted and logged where it was
            // refused, read again once this host's clock has caught up.
            Err(error) if error.code == "clock_ahead" => {}
            Err(error) => {
                tracing::warn!(function = %name, error = %error.message, "cannot keep a peer's registry entry; reading it again next round");
                cluster.reread();
            }
        }
    }
    changed.dedup();
    cluster.publish_each(state, &changed).await;
}

/// With the registry on NATS: joins every entry it holds, and each one
/// written after, into this host's records (the rounds then serve them),
/// until the function table is dropped.
pub async fn follow_shared(
    cluster: Arc<Cluster>,
    state: Weak<Functions>,
    shared: Arc<SharedRegistry>,
) {
    shared
        .follow(|entry| {
            let (cluster, state) = (Arc::clone(&cluster), state.upgrade());
            async move {
                let Some(state) = state else {
                    return false;
                };
                join(&cluster, &state, vec![entry]).await;
                true
            }
        })
        .await;
}

/// Names whose record needs work here (a version to serve or delete, a
/// module to fetch) and that no task works on or waits to retry.
fn unsettled(state: &Functions, progress: &Mutex<Progress>) -> Vec<FunctionName> {
    let mut progress = progress.lock().unwrap_or_else(|e| e.into_inner());
    let now = Instant::now();
    let candidates = state.scan_records(|record| {
        let name = &record.name;
        let stamp = record.fingerprint();
        if progress.settled.get(name) == Some(&stamp)
            || progress.applying.contains(name)
            || progress.failed.get(name).is_some_and(|(_, at)| *at > now)
        {
            return None;
        }
        let serving = record.serving.as_ref().map(|s| s.version);
        let active = record.entry.active().map(|v| v.id);
        let missing = record
            .entry
            .versions
            .iter()
            .any(|v| !state.store.has_module(&v.sha256));
        Some((name.clone(), stamp, serving == active && !missing))
    });
    let mut names = Vec::new();
    for (name, stamp, settled) in candidates {
        if settled {
            progress.settled.insert(name, stamp);
        } else {
            progress.applying.insert(name.clone());
            names.push(name);
        }
    }
    names
}

/// Makes this host serve the registry's active version of `name` (or
/// delete it), then fetches the modules of the other versions kept, so any
/// host can roll back to them and they outlive the host that took them.
/// Returns the fingerprint of the record it started from.
async fn apply(
    cluster: &Cluster,
    state: &Arc<Functions>,
    name: &FunctionName,
    max_upload: u64,
) -> anyhow::Result<u64> {
    let record = state
        .record(name)
        .ok_or_else(|| anyhow::anyhow!("no record of {name}"))?;
    let active = record.entry.active().cloned();
    let serving = record.serving.as_ref().map(|s| s.version);
    if serving != active.as_ref().map(|v| v.id) {
        let bytes = match &active {
            Some(v) if !state.store.has_module(&v.sha256) => {
                Some(fetch_module(cluster, &v.sha256, max_upload).await?)
            }
            _ => None,
        };
        let guard = state.lock_admin().await;
        state
            .serve_active(&guard, name, bytes)
            .await
            .map_err(|e| anyhow::anyhow!("{}", e.message))?;
        cluster.publish(state, name).await;
        drop(guard);
        let now = state
            .record(name)
            .and_then(|r| r.serving.map(|s| s.version));
        tracing::info!(function = %name, version = ?now, deleted = active.is_none(), "registry entry applied");
        let mut entry = from_peer(
            if active.is_some() { "serve" } else { "delete" },
            active.as_ref().map_or("", |v| v.origin.as_str()),
        );
        entry.function = Some(name.to_string());
        entry.version = active.as_ref().map(|v| v.id);
        entry.sha256 = active.map(|v| v.sha256);
        state.audit.record(entry).await;
    }
    for version in &record.entry.versions {
        if state.store.has_module(&version.sha256) {
            continue;
        }
        let bytes = fetch_module(cluster, &version.sha256, max_upload).await?;
        state.store.write_module(&version.sha256, &bytes)?;
        let guard = state.lock_admin().await;
        cluster.publish(state, name).await;
        drop(guard);
    }
    Ok(record.fingerprint())
}

/// Keeps policy files and the registry's policy texts in step. No file
/// and an empty text are the same (the defaults). A text the registry has
/// that this host's file does not is written to the file; a file edited
/// here (it says something this host neither wrote nor published; removed,
/// it says the defaults) becomes a change of the registry's text.
async fn sync_policies(cluster: &Cluster, state: &Functions, progress: &Mutex<Progress>) {
    let seen = state.scan_records(|record| {
        let file = state.policy_source(&record.name);
        let registry = record.entry.policy.as_ref().map_or("", |p| p.text.as_str());
        Some(if file.as_deref().unwrap_or_default() == registry {
            Policy::Same(record.name.clone(), text_hash(registry))
        } else {
            Policy::Differ(record.name.clone(), file, registry.to_string())
        })
    });
    for seen in seen {
        let (name, file, registry_text) = match seen {
            Policy::Same(name, hash) => {
                let mut guard = progress.lock().unwrap_or_else(|e| e.into_inner());
                guard.policies.insert(name, hash);
                continue;
            }
            Policy::Differ(name, file, registry) => (name, file, registry),
        };
        let name = &name;
        let file_text = file.clone().unwrap_or_default();
        let file_hash = text_hash(&file_text);
        // Before this host wrote or published anything of the function: a
        // file is an edit made here (while it was down, say); no file is a
        // host that has yet to write the registry's text.
        let (edited_here, skip) = {
            let guard = progress.lock().unwrap_or_else(|e| e.into_inner());
            let edited_here = match guard.policies.get(name) {
                Some(last) => file_hash != *last,
                None => file.is_some(),
            };
            let skip = if edited_here {
                guard.refused.get(name) == Some(&file_hash)
                    || guard
                        .retry_edit
                        .get(name)
                        .is_some_and(|at| Instant::now() < *at)
            } else {
                guard
                    .unwritable
                    .get(name)
                    .is_some_and(|(text, at)| *text == registry_text && at.elapsed() < RETRY_MAX)
            };
            (edited_here, skip)
        };
        if skip {
            continue;
        }
        if edited_here {
            tracing::info!(function = %name, "policy edited here; publishing it to the cluster");
            let admin = state.lock_admin().await;
            let recorded = state.set_policy(&admin, name, file_text).await;
            if recorded.is_ok() {
                cluster.publish(state, name).await;
            }
            drop(admin);
            let mut guard = progress.lock().unwrap_or_else(|e| e.into_inner());
            match recorded {
                Ok(_) => {
                    guard.refused.remove(name);
                    guard.retry_edit.remove(name);
                    guard.policies.insert(name.clone(), file_hash);
                }
                Err(error) if error.status != StatusCode::PAYLOAD_TOO_LARGE => {
                    // Not taken yet (a full disk, the registry on NATS
                    // unreachable): again in a while, until it is.
                    tracing::warn!(function = %name, error = %error.message, "a policy edited here cannot go to the cluster yet; trying again");
                    guard
                        .retry_edit
                        .insert(name.clone(), Instant::now() + RETRY_FIRST);
                }
                Err(error) => {
                    // Too large to gossip: once per edit, in force here
                    // and not in the cluster.
                    tracing::warn!(function = %name, error = %error.message, "a policy edited here cannot go to the cluster; it is in force on this host only");
                    guard.refused.insert(name.clone(), file_hash);
                }
            }
            continue;
        }
        let policies = Arc::clone(&state.policies);
        let (owned, to_write) = (name.clone(), registry_text.clone());
        let written =
            tokio::task::spawn_blocking(move || policies.write(&owned, &to_write).map(|_| ()))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()));
        {
            let mut guard = progress.lock().unwrap_or_else(|e| e.into_inner());
            match &written {
                Ok(()) => {
                    guard.unwritable.remove(name);
                    guard
                        .policies
                        .insert(name.clone(), text_hash(&registry_text));
                }
                Err(error) => {
                    tracing::warn!(function = %name, error, "cannot write the registry's policy here; keeping the file as it is");
                    guard
                        .unwritable
                        .insert(name.clone(), (registry_text, Instant::now()));
                }
            }
        }
        if written.is_ok() {
            let origin = state
                .record(name)
                .and_then(|r| r.entry.policy.map(|p| p.origin))
                .unwrap_or_default();
            let mut entry = from_peer("policy", &origin);
            entry.function = Some(name.to_string());
            state.audit.record(entry).await;
        }
    }
}

/// A function's policy file against the registry's text.
enum Policy {
    /// They say the same; its hash.
    Same(FunctionName, u64),
    /// The file's text (`None`: no file) and the registry's.
    Differ(FunctionName, Option<String>, String),
}

/// A policy text's hash: what the round remembers of texts it wrote or
/// published.
fn text_hash(text: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut hasher);
    hasher.finish()
}

/// Gets a module from a peer that holds it, checking its hash: a peer is
/// trusted with bytes, never with their identity (nor with compiled code).
async fn fetch_module(cluster: &Cluster, sha256: &str, max_upload: u64) -> anyhow::Result<Bytes> {
    let peers = cluster.peers();
    let holders: Vec<&Peer> = peers
        .iter()
        .filter(|p| p.modules.contains(sha256))
        .collect();
    if holders.is_empty() {
        cluster
            .metrics
            .module_fetches
            .with_label_values(&["unavailable"])
            .inc();
        anyhow::bail!("no live peer holds module {sha256}");
    }
    let mut last_error = None;
    for peer in holders {
        match fetch_from(cluster, peer, sha256, max_upload).await {
            Ok(bytes) if sha256_hex(&bytes) == sha256 => {
                cluster
                    .metrics
                    .module_fetches
                    .with_label_values(&["ok"])
                    .inc();
                tracing::info!(peer = %peer.node_id, sha256, size = bytes.len(), "module fetched");
                return Ok(bytes);
            }
            Ok(_) => {
                cluster
                    .metrics
                    .module_fetches
                    .with_label_values(&["hash_mismatch"])
                    .inc();
                tracing::error!(peer = %peer.node_id, sha256, "refusing a module whose bytes do not match its hash");
                last_error = Some(anyhow::anyhow!(
                    "peer {} sent a module that does not match {sha256}",
                    peer.node_id
                ));
            }
            Err(error) => {
                cluster
                    .metrics
                    .module_fetches
                    .with_label_values(&["failed"])
                    .inc();
                last_error = Some(error.context(format!("fetching from {}", peer.node_id)));
            }
        }
    }
    Err(last_error.unwrap_or_else(|| anyhow::anyhow!("module {sha256} not fetched")))
}

async fn fetch_from(
    cluster: &Cluster,
    peer: &Peer,
    sha256: &str,
    limit: u64,
) -> anyhow::Result<Bytes> {
    let target = format!("/v1/internal/modules/{sha256}");
    let mut request = Request::get(format!("{}{target}", peer.api))
        .body(Empty::new().map_err(|never| match never {}).boxed_unsync())?;
    cluster.sign(peer, &mut request, Some(b""))?;
    let response = tokio::time::timeout(Duration::from_secs(30), cluster.client.request(request))
        .await
        .map_err(|_| anyhow::anyhow!("timed out"))??;
    if response.status() != StatusCode::OK {
        anyhow::bail!("answered {}", response.status());
    }
    let mut body = response.into_body();
    let mut bytes = BytesMut::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            if bytes.len() as u64 + data.len() as u64 > limit {
                anyhow::bail!("the module is larger than the upload limit of {limit} bytes");
            }
            bytes.extend_from_slice(&data);
        }
    }
    Ok(bytes.freeze())
}

/// The audit line of a change a peer made (on `origin`) that this host
/// applied.
fn from_peer(what: &str, origin: &str) -> audit::Entry {
    let mut entry = audit::Entry::now("peer", what);
    entry.applied_from_peer = Some(origin.to_string());
    entry
}
