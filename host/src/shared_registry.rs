//! The cluster's registry on NATS JetStream (`--cluster-registry nats`),
//! for a site that runs NATS: each function's registry entry
//! ([`lichen_core::registry::Entry`], as JSON) is the value of its name in
//! the replicated key-value bucket `lichen-registry`, written by
//! compare-and-swap on the key's revision. Changes of one name are totally
//! ordered by the replicated log: a host makes its change on the latest
//! entry and writes it only if nobody wrote in between, else makes it again
//! on the newer one (see `Functions::make_change`).
//!
//! Each value is the entry sealed under the cluster secret
//! (`Keyring::seal_value`, AES-256-GCM under a one-time key wrapped for
//! each secret of a rotation; the key's name is bound in), so whoever can
//! write NATS but does not hold the secret can neither read a policy nor
//! set one: a value that does not open is refused, counted
//! (`lichen_registry_rejected_total`) and overwritten by the next change.
//! A value not sealed under every secret this host holds (one written
//! before a rotation began) is sealed again as it is read, on its
//! revision, so finishing a rotation leaves no entry unreadable.
//!
//! Hosts watch the bucket and join what they see into their records; from
//! there the cluster's sync serves it as it does gossiped entries, fetching
//! modules from peers by hash (modules never go through NATS). Gossip still
//! carries entries too: every entry a host has came from the bucket, so
//! joining them changes nothing the bucket did not say.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use tokio::sync::OnceCell;

use crate::kv::KvError;
use crate::kv::nats::{open_bucket, unavailable};
use crate::names::FunctionName;
use lichen_core::gossip::SealedText;
use lichen_core::registry::Entry;
use lichen_core::seal::Keyring;

/// The bucket (its stream is `KV_lichen-registry`). Function names have
/// no `_`, and stores' buckets are `lichen_<function>_<label>`, so no
/// store's bucket can be this one.
const BUCKET: &str = "lichen-registry";

/// How often a host reads the whole bucket again, beside watching it (a
/// watch that stalls while NATS moves its consumer misses nothing for
/// longer than this).
const RESCAN: Duration = Duration::from_secs(30);

pub struct SharedRegistry {
    js: jetstream::Context,
    replicas: usize,
    store: OnceCell<kv::Store>,
    keyring: Arc<Keyring>,
    rejected: prometheus::IntCounter,
}

/// The outcome of a conditional write.
pub enum Written {
    /// Written: the entry's new revision.
    At(u64),
    /// Somebody wrote the name after the revision the change was made on.
    Lost,
}

impl SharedRegistry {
    pub fn new(
        js: jetstream::Context,
        replicas: usize,
        keyring: Arc<Keyring>,
        rejected: prometheus::IntCounter,
    ) -> Self {
        SharedRegistry {
            js,
            replicas,
            store: OnceCell::new(),
            keyring,
            rejected,
        }
    }

    /// The entry a value holds, if it opens under the cluster's secret
    /// and names its key; a forged or mangled one is counted and logged.
    /// One that opens but lacks a secret this host holds is sealed again
    /// at `revision`.
    async fn open(&self, key: &str, value: &[u8], revision: u64) -> Result<Entry, KvError> {
        let text = serde_json::from_slice::<SealedText>(value).ok();
        let opened = text
            .as_ref()
            .and_then(|text| text.decode())
            .and_then(|sealed| self.keyring.open_value(&aad(key), &sealed));
        if let (Some(text), Some(json)) = (&text, &opened)
            && self
                .keyring
                .ids()
                .iter()
                .any(|id| !text.keys.contains_key(id))
        {
            self.reseal(key, json, revision).await;
        }
        let Some(json) = opened else {
            self.rejected.inc();
            tracing::warn!(
                key,
                "an entry of the cluster's registry (NATS) is not sealed under the cluster secret: refused"
            );
            return Err(KvError::Invalid(format!(
                "the registry's entry of {key} is not sealed under the cluster secret"
            )));
        };
        decode(key, &json)
    }

    /// The bucket, made on first use (NATS may be unreachable when the host
    /// starts; until it answers, changes fail and nothing is cached).
    async fn store(&self) -> Result<&kv::Store, KvError> {
        self.store
            .get_or_try_init(|| async {
                open_bucket(&self.js, BUCKET, self.replicas, true, Duration::ZERO)
                    .await?
                    .ok_or_else(|| unavailable(format!("the bucket {BUCKET} is missing")))
            })
            .await
    }

    /// Seals `json` (an entry that opened) again under every secret held,
    /// if `key` is still at `revision`; a lost race or a failure is left
    /// to the next reader.
    async fn reseal(&self, key: &str, json: &[u8], revision: u64) {
        let Ok(store) = self.store().await else {
            return;
        };
        let Ok(sealed) = self.keyring.seal_value(&aad(key), json) else {
            return;
        };
        let Ok(value) = serde_json::to_vec(&SealedText::from(&sealed)) else {
            return;
        };
        match crate::kv::nats::write_once(&self.js, store, key, Some(value.into()), revision).await
        {
            Ok(crate::kv::nats::Cas::Lost) => {
                tracing::debug!(
                    key,
                    "sealing an entry of the cluster's registry again: it changed, left for later"
                )
            }
            Ok(crate::kv::nats::Cas::Applied(_)) => tracing::info!(
                key,
                "an entry of the cluster's registry sealed again under the secrets held now"
            ),
            Err(error) => {
                tracing::debug!(key, %error, "sealing an entry of the cluster's registry again: left for later")
            }
        }
    }

    /// The latest entry of `name` and its revision (0: never written).
    pub async fn read(&self, name: &FunctionName) -> Result<(Option<Entry>, u64), KvError> {
        let store = self.store().await?;
        let found = store.entry(name.as_str()).await.map_err(unavailable)?;
        let Some(found) = found else {
            return Ok((None, 0));
        };
        if found.operation != kv::Operation::Put {
            return Ok((None, found.revision));
        }
        // A value that does not open is no entry: the next change
        // overwrites it (on its revision).
        match self.open(name.as_str(), &found.value, found.revision).await {
            Ok(entry) => Ok((Some(entry), found.revision)),
            Err(_) => Ok((None, found.revision)),
        }
    }

    /// Writes `entry` as `name`'s, if `revision` is still its latest (0:
    /// if nobody has written it).
    pub async fn write(
        &self,
        name: &FunctionName,
        entry: &Entry,
        revision: u64,
    ) -> Result<Written, KvError> {
        let store = self.store().await?;
        let json = serde_json::to_vec(entry).map_err(|e| KvError::Invalid(e.to_string()))?;
        let sealed = self
            .keyring
            .seal_value(&aad(name.as_str()), &json)
            .map_err(|e| KvError::Invalid(format!("sealing {name}'s entry: {e}")))?;
        let value = serde_json::to_vec(&SealedText::from(&sealed))
            .map_err(|e| KvError::Invalid(e.to_string()))?;
        match crate::kv::nats::write_once(
            &self.js,
            store,
            name.as_str(),
            Some(value.into()),
            revision,
        )
        .await
        {
            Ok(crate::kv::nats::Cas::Applied(revision)) => Ok(Written::At(revision)),
            Ok(crate::kv::nats::Cas::Lost) => Ok(Written::Lost),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Hands every entry in the bucket to `seen`, then every entry written
    /// after, until `seen` returns `false`. Reads the whole bucket again
    /// every [`RESCAN`] and after any failure (a second later).
    pub async fn follow<F>(&self, mut seen: impl FnMut(Entry) -> F)
    where
        F: Future<Output = bool>,
    {
        // Said once when watching starts failing, not every second after
        // (a watch that then runs its whole round resets it).
        let mut failing = false;
        loop {
            match self.follow_once(&mut seen).await {
                Ok(false) => return,
                Ok(true) => failing = false,
                Err(error) => {
                    if !std::mem::replace(&mut failing, true) {
                        tracing::warn!(%error, "the cluster's registry (NATS) cannot be watched; trying again every second");
                    } else {
                        tracing::debug!(%error, "the cluster's registry (NATS) still cannot be watched");
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// One watch, from the latest entry of every name, for [`RESCAN`].
    /// `Ok(false)`: `seen` asked to stop.
    async fn follow_once<F>(&self, seen: &mut impl FnMut(Entry) -> F) -> Result<bool, KvError>
    where
        F: Future<Output = bool>,
    {
        let store = self.store().await?;
        let mut watch = store.watch_with_history(">").await.map_err(unavailable)?;
        let until = tokio::time::Instant::now() + RESCAN;
        loop {
            let next = match tokio::time::timeout_at(until, watch.next()).await {
                Err(_) => return Ok(true),
                Ok(None) => return Err(unavailable("the watch ended")),
                Ok(Some(next)) => next.map_err(unavailable)?,
            };
            if next.operation != kv::Operation::Put {
                continue;
            }
            match self.open(&next.key, &next.value, next.revision).await {
                Ok(entry) => {
                    if !seen(entry).await {
                        return Ok(false);
                    }
                }
                Err(error) => {
                    tracing::warn!(key = %next.key, %error, "skipping an entry of the cluster's registry (NATS)");
                }
            }
        }
    }
}

/// What a sealed entry is bound to: its key, so a value moved under
/// another name does not open.
fn aad(key: &str) -> Vec<u8> {
    format!("lichen registry entry v1\n{key}").into_bytes()
}

/// The entry stored under `key`: JSON of an entry of that name.
fn decode(key: &str, value: &[u8]) -> Result<Entry, KvError> {
    let entry: Entry = serde_json::from_slice(value)
        .map_err(|e| KvError::Invalid(format!("the registry's entry of {key}: {e}")))?;
    if entry.name != key {
        return Err(KvError::Invalid(format!(
            "the registry's entry under {key} names {}",
            entry.name
        )));
    }
    Ok(entry)
}
