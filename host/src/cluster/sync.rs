//! The gossip round of a host: publish its load, read its peers, and apply
//! registry entries newer than its own (fetching modules by hash).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};

use super::registry::Entry;
use super::{CLUSTER_AUTH_HEADER, Cluster, Peer};
use crate::functions::Functions;
use crate::names::FunctionName;
use crate::store::{VersionInfo, sha256_hex};

/// How long an entry that failed to apply waits before the next try.
const RETRY_APPLY: Duration = Duration::from_secs(1);

/// Runs the host's rounds until its function table is dropped. Modules
/// fetched from peers are capped at `max_upload` bytes, like uploads.
pub async fn run(cluster: Arc<Cluster>, state: Weak<Functions>, max_upload: u64) {
    let applying: Arc<Mutex<HashSet<String>>> = Arc::default();
    // Entries that failed to apply, by name: retried after a pause.
    let failed: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    if let Some(state) = state.upgrade() {
        publish_stored(&cluster, &state).await;
    }
    let mut tick = tokio::time::interval(cluster.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(state) = state.upgrade() else { return };
        let (free, load) = state.scheduler.host_load();
        cluster.gossip_round(free, load).await;
        failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, at| at.elapsed() < RETRY_APPLY);
        for entry in newest_entries(&cluster.peers()) {
            if cluster
                .entry(&entry.name)
                .is_some_and(|ours| !entry.newer_than(&ours))
                || failed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .contains_key(&entry.name)
                || !applying
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(entry.name.clone())
            {
                continue;
            }
            let (cluster, state) = (Arc::clone(&cluster), Arc::clone(&state));
            let (applying, failed) = (Arc::clone(&applying), Arc::clone(&failed));
            tokio::spawn(async move {
                let name = entry.name.clone();
                if apply(&cluster, &state, entry, max_upload).await.is_err() {
                    failed
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(name.clone(), Instant::now());
                }
                applying
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&name);
            });
        }
        publish_policy_edits(&cluster, &state, &applying).await;
    }
}

/// For each function, the newest entry any peer serves.
fn newest_entries(peers: &[Peer]) -> Vec<Entry> {
    let mut newest: HashMap<&str, &Entry> = HashMap::new();
    for entry in peers.iter().flat_map(|p| p.functions.values()) {
        match newest.get(entry.name.as_str()) {
            Some(known) if !entry.newer_than(known) => {}
            _ => {
                newest.insert(&entry.name, entry);
            }
        }
    }
    newest.into_values().cloned().collect()
}

/// Publishes what this host stored before it joined: the deletes it
/// remembers, then its functions, with the timestamp of the entry each came
/// from (or its upload time). A stored function older than a remembered
/// delete of it (a data directory put back from a backup, say) is deleted.
async fn publish_stored(cluster: &Cluster, state: &Functions) {
    match state.store.load_deletions() {
        Ok(deletions) => {
            for bytes in deletions {
                match serde_json::from_slice::<Entry>(&bytes) {
                    Ok(entry) if entry.is_tombstone() => cluster.publish(&state.store, entry).await,
                    Ok(entry) => {
                        tracing::warn!(function = %entry.name, "a remembered delete that is not one; ignored")
                    }
                    Err(error) => tracing::warn!(%error, "skipping a remembered delete"),
                }
            }
        }
        Err(error) => tracing::warn!(error = format!("{error:#}"), "reading remembered deletes"),
    }
    let records = match state.store.load_records() {
        Ok(records) => records,
        Err(error) => {
            tracing::warn!(error = format!("{error:#}"), "reading stored functions");
            return;
        }
    };
    for record in records {
        let Some(active) = record.active_version() else {
            continue;
        };
        let entry = Entry {
            name: record.name.to_string(),
            sha256: Some(active.sha256.clone()),
            version: active.version,
            policy: state.policy_source(&record.name),
            timestamp_ms: active
                .timestamp_ms
                .unwrap_or(active.created_unix.saturating_mul(1000)),
            origin: cluster.node_id.clone(),
        };
        if cluster
            .entry(&entry.name)
            .is_some_and(|known| known.newer_than(&entry))
        {
            let guard = state.lock_admin().await;
            if let Err(error) = state.delete(&guard, &record.name) {
                tracing::warn!(function = %record.name, error = %error.message, "cannot delete a function deleted after it was stored");
            }
            continue;
        }
        cluster.publish(&state.store, entry).await;
    }
}

/// Policy files edited on this host's disk become registry changes.
async fn publish_policy_edits(
    cluster: &Cluster,
    state: &Functions,
    applying: &Mutex<HashSet<String>>,
) {
    // Only entries whose policy file now says something else are copied.
    let edited: Vec<(String, Option<String>, u64, String)> = {
        let registry = cluster.registry.lock().unwrap_or_else(|e| e.into_inner());
        registry
            .entries()
            .filter(|e| !e.is_tombstone())
            .filter_map(|e| {
                let name = FunctionName::new(&e.name).ok()?;
                let policy = state.policies.status(&name).policy?;
                (e.policy.as_deref() != Some(policy.text.as_str())).then(|| {
                    (
                        e.name.clone(),
                        e.sha256.clone(),
                        e.version,
                        policy.text.clone(),
                    )
                })
            })
            .collect()
    };
    for (name, sha256, version, source) in edited {
        if applying
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&name)
        {
            continue;
        }
        tracing::info!(function = %name, "policy edited here; publishing it to the cluster");
        cluster
            .publish_local(&state.store, &name, sha256, version, Some(source))
            .await;
    }
}

/// Makes this host serve `entry` (or delete the function), then publishes it.
async fn apply(
    cluster: &Cluster,
    state: &Arc<Functions>,
    entry: Entry,
    max_upload: u64,
) -> anyhow::Result<()> {
    let name = FunctionName::new(&entry.name)
        .map_err(|e| anyhow::anyhow!("registry entry for an invalid name: {e}"))?;
    let result = apply_inner(cluster, state, &name, &entry, max_upload).await;
    match &result {
        Ok(()) => {
            tracing::info!(function = %name, version = entry.version, origin = %entry.origin, deleted = entry.is_tombstone(), "registry entry applied");
            cluster.publish(&state.store, entry).await;
        }
        Err(error) => {
            tracing::warn!(function = %name, origin = %entry.origin, error = format!("{error:#}"), "cannot apply a registry entry yet");
        }
    }
    result
}

async fn apply_inner(
    cluster: &Cluster,
    state: &Arc<Functions>,
    name: &FunctionName,
    entry: &Entry,
    max_upload: u64,
) -> anyhow::Result<()> {
    let Some(sha256) = entry.sha256.clone() else {
        let guard = state.lock_admin().await;
        if superseded(cluster, entry) {
            return Ok(());
        }
        state
            .delete(&guard, name)
            .map_err(|e| anyhow::anyhow!("{}", e.message))?;
        cluster.forget_function(name.as_str());
        return Ok(());
    };
    if state.active_sha(name).as_deref() != Some(sha256.as_str()) {
        let bytes = if state.store.has_module(&sha256) {
            None
        } else {
            Some(fetch_module(cluster, &sha256, max_upload).await?)
        };
        let size = match &bytes {
            Some(bytes) => bytes.len() as u64,
            None => state.store.read_module(&sha256)?.len() as u64,
        };
        let version = VersionInfo {
            version: entry.version,
            sha256: sha256.clone(),
            size,
            created_unix: super::now_ms() / 1000,
            timestamp_ms: Some(entry.timestamp_ms),
            // Set from the component when it is prepared.
            abi: Default::default(),
            oci: None,
        };
        let guard = state.lock_admin().await;
        if superseded(cluster, entry) {
            return Ok(());
        }
        let record = state
            .record_or_new(name)
            .map_err(|e| anyhow::anyhow!("{}", e.message))?;
        state
            .activate(&guard, record, version, bytes)
            .await
            .map_err(|e| anyhow::anyhow!("{}", e.message))?;
    }
    if let Some(policy) = &entry.policy
        && state.policy_source(name).as_ref() != Some(policy)
    {
        let policies = Arc::clone(&state.policies);
        let (name, policy) = (name.clone(), policy.clone());
        tokio::task::spawn_blocking(move || policies.write(&name, &policy))
            .await?
            .map_err(|e| anyhow::anyhow!("the registry's policy: {e}"))?;
    }
    Ok(())
}

/// Whether this host has meanwhile taken a change at least as new as
/// `entry` (a deploy or delete made here while it was being fetched).
fn superseded(cluster: &Cluster, entry: &Entry) -> bool {
    cluster
        .entry(&entry.name)
        .is_some_and(|ours| !entry.newer_than(&ours))
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
    let request = Request::get(format!("{}/v1/internal/modules/{sha256}", peer.api))
        .header(CLUSTER_AUTH_HEADER, cluster.secret.token())
        .body(Empty::new().map_err(|never| match never {}).boxed_unsync())?;
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

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashMap};

    use super::*;

    fn entry(name: &str, ts: u64, origin: &str) -> Entry {
        Entry {
            name: name.to_string(),
            sha256: Some(format!("{name}-{ts}")),
            version: ts,
            policy: None,
            timestamp_ms: ts,
            origin: origin.to_string(),
        }
    }

    fn peer(id: &str, entries: &[Entry]) -> Peer {
        Peer {
            node_id: id.to_string(),
            api: String::new(),
            gossip: ([127, 0, 0, 1], 1).into(),
            free_slots: 1,
            load: 0,
            kv: String::new(),
            functions: entries
                .iter()
                .map(|e| (e.name.clone(), e.clone()))
                .collect::<HashMap<_, _>>(),
            modules: BTreeSet::new(),
        }
    }

    #[test]
    fn the_newest_entry_of_each_function_across_peers_is_the_one_to_apply() {
        let peers = [
            peer("a", &[entry("f", 10, "a"), entry("g", 5, "a")]),
            peer("b", &[entry("f", 20, "b"), entry("g", 5, "c")]),
            peer("c", &[entry("f", 20, "a")]),
        ];
        let mut newest = newest_entries(&peers);
        newest.sort_by(|x, y| x.name.cmp(&y.name));
        assert_eq!(newest, [entry("f", 20, "b"), entry("g", 5, "c")]);
    }
}
